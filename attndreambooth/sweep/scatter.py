"""The identity-vs-text-alignment scatter, as the field plots it: one labelled point per run or method,
optionally with error bars (95 % intervals) and fixed axes."""
from PIL import Image, ImageDraw, ImageFont


def scatter(points, path, size=420, x_label="text alignment (CLIP-T)", y_label="identity (DINO)", span=None,
            grey=()):
    """`points`: (label, x, y) or (label, x, y, x half-width, y half-width). Axes fit the points unless
    `span` = (low, high) fixes both; labels in `grey` are drawn grey (a reference)."""
    font, pad = ImageFont.load_default(), 50
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    points = [(p[0], p[1], p[2], *(p[3:] or (0.0, 0.0))) for p in points]
    fit = lambda v: (min(v) - 0.05 * (max(v) - min(v) or 1), max(v) + 0.05 * (max(v) - min(v) or 1))  # noqa: E731
    ends = lambda i: [p[i] + s * p[i + 2] for p in points for s in (-1, 1)]  # noqa: E731  (the bars fit too)
    (x0, x1), (y0, y1) = (span, span) if span else (fit(ends(1)), fit(ends(2)))
    px = lambda x: pad + (x - x0) / (x1 - x0) * (size - 2 * pad)  # noqa: E731
    py = lambda y: size - pad - (y - y0) / (y1 - y0) * (size - 2 * pad)  # noqa: E731
    draw.rectangle([pad, pad, size - pad, size - pad], outline="black")
    draw.text((size // 2 - 50, size - pad + 18), x_label, fill="black", font=font)
    draw.text((4, 8), y_label, fill="black", font=font)
    for v, pos in ((x0, pad), (x1, size - pad)):
        draw.text((pos - 12, size - pad + 4), f"{v:.3f}", fill="black", font=font)
    for v, pos in ((y0, size - pad), (y1, pad)):
        draw.text((2, pos - 6), f"{v:.3f}", fill="black", font=font)
    for label, x, y, dx, dy in points:
        colour = "gray" if label in grey else "red"
        draw.line([px(x - dx), py(y), px(x + dx), py(y)], fill=colour)
        draw.line([px(x), py(y - dy), px(x), py(y + dy)], fill=colour)
        draw.ellipse([px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4], fill=colour)
        width = draw.textlength(label, font=font)
        left = px(x) + 6 if px(x) + 6 + width < size else px(x) - 6 - width  # keep the label inside
        draw.text((left, py(y) - 6), label, fill="black", font=font)
    image.save(path)
