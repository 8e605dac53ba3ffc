"""How good the shapes world's base model is, measured: the VAE's round trip, held-out captions read back
attribute by attribute, where each shape word's cross-attention falls (IoU with its object), and each
concept's descriptive-caption floor (the identity the base model reaches with the best caption a user could
write, beside the category word alone). Written by worlds/shapes/__main__.py into report.json."""
import json
import random
import textwrap
from itertools import product

import numpy as np
import torch

from worlds.shapes.read import alignment, describe, identity, match_objects
from worlds.shapes.scene import (COLOURS, CONCEPTS, DESCRIBED, OBJECT_COLOURS, concept_photos, random_scene)
from worlds.scoring import attention_iou

STEPS, CFG = 25, 7.5  # the report's sampler: DPM++ 25 steps, classifier-free guidance 7.5


def _accumulate(totals, checks):
    for key, ok in checks.items():
        hit, n = totals.get(key, (0, 0))
        totals[key] = (hit + ok, n + 1)


@torch.no_grad()
def round_trip(vae, images):
    """PIL images through the VAE, encode (posterior mean) then decode, back as 8-bit PIL images."""
    from worlds.shapes.pretrain import to_tensor
    from PIL import Image
    x = to_tensor([np.asarray(im.convert("RGB")) for im in images]).to(vae.device, vae.dtype)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    return [Image.fromarray(((a.permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy()) for a in y]


@torch.no_grad()
def vae_round_trip(vae, n=300, seed=0):
    """Accuracy of every attribute after encode (posterior mean) and decode of `n` random scenes, and each
    concept's identity after the round trip of 8 of its photos."""
    rng = random.Random(f"round-trip-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    totals = {}
    for i in range(0, n, 50):
        images = round_trip(vae, [s.render(rng.randrange(2**31)) for s in scenes[i:i + 50]])
        for scene, image in zip(scenes[i:i + 50], images):
            _accumulate(totals, alignment(image, scene)[1])
    photos = {c: [im for _, im in concept_photos(c, 8, seed=123)] for c in CONCEPTS}
    ids = {c: float(np.mean([identity(im, c) for im in round_trip(vae, photos[c])])) for c in CONCEPTS}
    return dict(scenes=n, accuracy={k: h / t for k, (h, t) in totals.items()}, identity=ids)


def _word_position(tokenizer, caption, word, last=False):
    tokens = tokenizer.tokenize(caption)
    hits = [i for i, t in enumerate(tokens) if t.replace("</w>", "") == word]
    return 1 + (hits[-1] if last else hits[0])  # the start token comes first


def pooled(mask, grid):
    """A (64, 64) mask averaged down to a map grid (h, w): a perfectly placed attention map."""
    t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, tuple(grid))[0, 0].numpy()


def held_out(pipe, n=200, seed=0, log=print):
    """Per-attribute accuracy of `n` held-out captions (one image each), and the attention IoU of the main
    object's shape word with the main object's mask (and of the second object's shape word with the second
    object's), maps from the project's attention-map code, thresholded as for [V]'s IoU; 0 where the object
    is missing."""
    from attndreambooth.inference.sampling import sample
    rng = random.Random(f"held-out-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    totals, scores, iou_main, iou_second, ceiling = {}, [], [], [], []
    for i, scene in enumerate(scenes):
        caption = scene.caption()
        (image,), maps = sample(pipe, caption, 1, seed + i, steps=STEPS, guidance_scale=CFG, attention_maps=True)
        seen = describe(image)  # read once: the alignment and the objects' masks both come from it
        score, checks = alignment(image, scene, seen)
        scores.append(score)
        _accumulate(totals, checks)
        main, second = match_objects(seen, scene.attributes())
        m = maps[0].numpy()
        iou_main.append(attention_iou(m[_word_position(pipe.tokenizer, caption, scene.main.shape)], main["blob"].mask)
                        if main else 0.0)
        if main:  # the best a map at this grid can do: the object's own mask, pooled to it
            ceiling.append(attention_iou(pooled(main["blob"].mask, m.shape[-2:]), main["blob"].mask))
        if scene.second:
            pos = _word_position(pipe.tokenizer, caption, scene.second.shape, last=True)
            iou_second.append(attention_iou(m[pos], second["blob"].mask) if second else 0.0)
        if (i + 1) % 25 == 0:
            log(f"held-out {i + 1}/{n}: alignment {np.mean(scores):.3f}, shape-word IoU {np.mean(iou_main):.3f}")
    return dict(captions=n, alignment=float(np.mean(scores)), accuracy={k: h / t for k, (h, t) in totals.items()},
                attention_iou=dict(main=float(np.mean(iou_main)), second=float(np.mean(iou_second or [0.0])),
                                   second_captions=len(iou_second), ceiling=float(np.mean(ceiling or [0.0]))))


def describing_captions(concept):
    """The captions a user could write for a concept: its pattern word with the two palette colours nearest
    each of its colours (four pairs), as "{fill} {category}"."""
    category, (pattern, a, b) = CONCEPTS[concept][0], DESCRIBED[concept]
    near = lambda rgb: sorted(OBJECT_COLOURS, key=lambda n: sum((p - q) ** 2 for p, q in zip(rgb, COLOURS[n])))[:2]  # noqa: E731
    pairs = [(x, y) for x, y in product(near(a), near(b)) if x != y]
    return [f"{x} and {y} {pattern} {category}" for x, y in pairs]


def caption_floor(pipe, concepts, n=8, seed=0, steps=STEPS):
    """{concept: {"category word": identity, "best caption": identity, "caption": the best one}}: `n` images
    of "a big {words} ..." (positions and backgrounds of the concept's benchmark scenes) per caption, each
    sampled with `steps` DPM++ steps."""
    from attndreambooth.inference.sampling import sample
    out = {}
    for concept in concepts:
        rng = random.Random(f"floor-{concept}-{seed}")
        scenes = [random_scene(rng, second_prob=0, concept=concept) for _ in range(n)]

        def mean_identity(words):
            values = []
            for i, sc in enumerate(scenes):
                text = sc.caption(placeholder="{}", omit=("size",)).replace("{} " + sc.main.shape, "big " + words)
                (image,), _ = sample(pipe, text, 1, seed + i, steps=steps, guidance_scale=CFG)
                values.append(identity(image, concept))
            return float(np.mean(values))

        ranked = sorted(((mean_identity(c), c) for c in describing_captions(concept)), reverse=True)
        out[concept] = {"category word": mean_identity(CONCEPTS[concept][0]), "best caption": ranked[0][0],
                        "caption": ranked[0][1], "captions tried": {c: v for v, c in ranked}}
    return out


def sample_grid(pipe, path, n=12, seed=1, scenes=None):
    """Held-out captions (or those of `scenes`), each with its sample, captions under the images."""
    from PIL import Image, ImageDraw, ImageFont
    from attndreambooth.inference.sampling import sample
    rng = random.Random(f"grid-{seed}")
    scenes = scenes or [random_scene(rng) for _ in range(n)]
    n = len(scenes)
    cell, text_h, cols = 192, 40, 4
    grid = Image.new("RGB", (cols * cell, (n + cols - 1) // cols * (cell + text_h)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, scene in enumerate(scenes):
        (image,), _ = sample(pipe, scene.caption(), 1, seed + i, steps=STEPS, guidance_scale=CFG)
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        caption = "\n".join(textwrap.wrap(scene.caption(), width=30)[:3])  # ~6 px a character
        draw.multiline_text((x + 2, y + cell + 2), caption, fill="black", font=font, spacing=1)
    grid.save(path)


def attention_figure(pipe, path, caption="a big red and white striped star on the left on a blue background next "
                                         "to a yellow circle", n=2, seed=0):
    """The paper's Fig. 2 in this world: one caption's per-token cross-attention maps, `n` images."""
    from attndreambooth.inference.attention_maps import figure, token_labels
    from attndreambooth.inference.sampling import sample
    images, maps = sample(pipe, caption, n, seed, steps=STEPS, guidance_scale=CFG, attention_maps=True)
    ids = pipe.tokenizer(caption, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids[0]
    figure(images, maps, token_labels(pipe.tokenizer, ids), f"base model: {caption}", panel=96).save(path)


def write_report(out, report, args, log):
    """Measure the model saved in `out`, write report.json, samples.png and attention.png; returns the report."""
    from attndreambooth.inference.loading import load_pipe
    if not (args.round_trip_scenes or args.eval_captions):
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return report
    pipe = load_pipe(base=out)[0]
    pipe.set_progress_bar_config(disable=True)
    if args.round_trip_scenes:
        report["vae_round_trip"] = vae_round_trip(pipe.vae, args.round_trip_scenes, seed=args.seed)
        log(f"vae round trip: {json.dumps(report['vae_round_trip'])}")
    if args.eval_captions:
        report["eval"] = held_out(pipe, args.eval_captions, args.seed, log)
        log(f"held-out captions: {json.dumps(report['eval'])}")
        report["floor"] = caption_floor(pipe, sorted(CONCEPTS), seed=args.seed)
        log(f"descriptive-caption floor: {json.dumps(report['floor'])}")
        sample_grid(pipe, out / "samples.png")
        attention_figure(pipe, out / "attention.png")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
