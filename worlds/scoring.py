"""Scoring infer.py's samples in a world (worlds.load): each prompt folder's images against the scene its
caption describes (text alignment, by the world's readers), the concept (identity), and, where infer.py saved
them (--attention_maps), the cross-attention maps ([V]'s share of the attention, and where it falls)."""
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attndreambooth.trainer.data import IMAGE_SUFFIXES, load_rgb


def attention_share(maps, tokens, placeholder):
    """[V]'s share of the attention mass that the prompt's words get (start, end and padding left out),
    averaged over pixels and images: the paper's "attention overfitting" when it nears 1."""
    words = list(range(maps.shape[1]))[1:1 + len(tokens)]
    v = 1 + list(tokens).index(placeholder)
    mass = maps[:, words].sum(axis=(2, 3))  # (images, words)
    return float((maps[:, v].sum(axis=(1, 2)) / mass.sum(axis=1)).mean())


def attention_iou(map_v, mask):
    """IoU of [V]'s map (upsampled to the image, kept where it is above half its range) with the object's mask."""
    up = F.interpolate(torch.as_tensor(map_v, dtype=torch.float32)[None, None], size=mask.shape,
                       mode="bilinear", align_corners=False)[0, 0].numpy()
    hot = up > (up.min() + up.max()) / 2
    return float((hot & mask).sum() / max((hot | mask).sum(), 1))


def score_folder(world, folder, concept=None, placeholder="<v>"):
    """Per-prompt numbers for one infer.py prompt folder."""
    record = json.loads((Path(folder) / "prompt.json").read_text())
    placeholder = record.get("placeholder", placeholder)
    if concept is not None and "{}" in record.get("template", ""):  # the benchmark's scene, whatever {} was
        scene = world.parse_caption(record["template"].replace("{}", f"<v> {world.CONCEPTS[concept][0]}"), "<v>",
                                     concept)
    else:  # (the base model's "best caption" names colours and a pattern: its scene is still the concept's)
        scene = world.parse_caption(record["prompt"], placeholder, concept)
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit())
    images = [load_rgb(p) for p in paths]
    out = dict(prompt=record["prompt"], images=len(images),
               text=statistics.mean(world.alignment(im, scene)[0] for im in images))
    if scene.main.concept:
        out["identity"] = statistics.mean(world.identity(im, scene.main.concept) for im in images)
    maps_file = Path(folder) / "attention_maps.npz"
    if scene.main.concept and placeholder and maps_file.is_file():  # a base model's reference has no [V]
        data = np.load(maps_file)
        maps, tokens = data["maps"], [str(t) for t in data["tokens"]]
        out["attention_share"] = attention_share(maps, tokens, placeholder)
        v = 1 + tokens.index(placeholder)
        ious = [attention_iou(m[v], found[0].mask) for m, im in zip(maps, images) if (found := world.blobs(im))]
        out["attention_iou"] = statistics.mean(ious) if ious else 0.0
    return out


def score_samples(world, samples, concept=None, placeholder="<v>"):
    """Per-prompt and overall (mean over prompts) numbers of an infer.py samples folder."""
    if concept is not None and concept not in world.CONCEPTS:
        raise ValueError(f"--concept {concept!r} is not one of {sorted(world.CONCEPTS)}")
    prompts = [score_folder(world, f, concept, placeholder)
               for f in sorted(p for p in Path(samples).iterdir() if (p / "prompt.json").is_file())]
    if not prompts:
        raise ValueError(f"--samples: {samples} holds no prompt folders (with prompt.json), as infer.py writes them")
    keys = [k for k in ("identity", "text", "attention_share", "attention_iou") if any(k in p for p in prompts)]
    overall = {k: statistics.mean(p[k] for p in prompts if k in p) for k in keys}
    return dict(overall=overall, prompts=prompts, world=world.NAME, concept=concept)
