"""Draw the bundled sample concept: a small red robot toy, five photos (128 px JPEG, a few KB each).

    python tools/make_sample_concept.py [out_dir]     # default: data/sample_toy

Drawn in code, so it carries no licence of anyone else's. Deterministic.
"""
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

BACKGROUNDS = [((214, 200, 170), (150, 120, 90)), ((180, 205, 230), (90, 130, 90)), ((235, 235, 235), (120, 120, 130)),
               ((200, 225, 190), (160, 110, 70)), ((240, 215, 200), (110, 90, 80))]


def draw_toy(draw, cx, cy, s, tilt):
    """The robot: red body, grey head with two eyes and an antenna, blue arms and legs."""
    dx = tilt * s
    draw.rectangle([cx - 0.5 * s, cy + 0.55 * s, cx - 0.2 * s, cy + 1.0 * s], fill=(40, 70, 170))  # legs
    draw.rectangle([cx + 0.2 * s, cy + 0.55 * s, cx + 0.5 * s, cy + 1.0 * s], fill=(40, 70, 170))
    draw.rounded_rectangle([cx - 0.65 * s, cy - 0.2 * s, cx + 0.65 * s, cy + 0.6 * s], 0.12 * s, fill=(200, 35, 40))
    draw.ellipse([cx - 0.15 * s, cy + 0.05 * s, cx + 0.15 * s, cy + 0.35 * s], fill=(250, 210, 60))  # chest light
    draw.rectangle([cx - 0.95 * s, cy - 0.15 * s, cx - 0.7 * s, cy + 0.45 * s], fill=(40, 70, 170))  # arms
    draw.rectangle([cx + 0.7 * s, cy - 0.15 * s, cx + 0.95 * s, cy + 0.45 * s], fill=(40, 70, 170))
    draw.rounded_rectangle([cx - 0.45 * s + dx, cy - 0.75 * s, cx + 0.45 * s + dx, cy - 0.22 * s], 0.1 * s,
                           fill=(170, 170, 180))  # head
    for ex in (-0.2, 0.2):
        draw.ellipse([cx + (ex - 0.08) * s + dx, cy - 0.58 * s, cx + (ex + 0.08) * s + dx, cy - 0.42 * s],
                     fill=(20, 20, 20))
    draw.line([cx + dx, cy - 0.75 * s, cx + dx, cy - 0.95 * s], fill=(60, 60, 60), width=max(1, int(0.05 * s)))
    draw.ellipse([cx - 0.07 * s + dx, cy - 1.02 * s, cx + 0.07 * s + dx, cy - 0.88 * s], fill=(250, 210, 60))


def main(out_dir="data/sample_toy", size=128):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i, (wall, floor) in enumerate(BACKGROUNDS):
        image = Image.new("RGB", (size, size), wall)
        draw = ImageDraw.Draw(image)
        horizon = int(size * rng.uniform(0.6, 0.72))
        draw.rectangle([0, horizon, size, size], fill=floor)
        s = size * rng.uniform(0.22, 0.3)
        draw_toy(draw, size * rng.uniform(0.38, 0.62), horizon - 0.4 * s, s, rng.uniform(-0.12, 0.12))
        image = image.filter(ImageFilter.GaussianBlur(0.6))
        image.save(out / f"toy_{i}.jpg", quality=85)
    print(f"wrote {len(BACKGROUNDS)} images to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
