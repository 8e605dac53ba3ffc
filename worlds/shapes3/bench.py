"""The third shapes world as the comparison uses it (worlds/__init__.py says what a world names): its concepts'
photos, its base model, its readers, the inverse of its captions, and each concept's best-caption floor."""
import random
import re
from itertools import product
from pathlib import Path

import numpy as np

from worlds.shapes.read import blobs
from worlds.shapes.scene import BACKGROUNDS, COLOURS, OBJECT_COLOURS, PHRASES, SHAPES
from worlds.shapes3.read import alignment, identity
from worlds.shapes3.scene import (APPEARANCES, CONCEPTS, PATTERNS, RADII, Scene, Thing, concept_photos,
                                  random_scene)

__all__ = ["NAME", "CONCEPTS", "DATA", "MODEL", "MODEL_WORDS", "SAMPLER_STEPS", "random_scene", "parse_caption",
           "alignment", "identity", "blobs", "caption_floor"]  # what a world names (worlds/__init__.py)
NAME = "shapes3"
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "shapes3"  # each concept's five photos: concept_photos(concept, 5)
MODEL = ROOT / "models" / "shapes"  # the shipped base model
MODEL_WORDS = tuple(APPEARANCES)  # a model of this world has a token for each; another world's has none
SAMPLER_STEPS = 25  # appearance colours are met within 60 RGB: 15 steps met 61 %, 25 met 100 %
_PHRASE = {v: k for k, v in PHRASES.items()}


def parse_caption(text, placeholder="<v>", concept=None):
    """The Scene a caption of the grammar describes, attributes it leaves out None ("a big <v> star on a blue
    background", "a harlequin star", "a red and white striped star"). The main object is `concept` when the
    caption writes "[V] category", or the category alone ("a big star ...", the base model's reference)."""
    words = "|".join
    v = re.escape(placeholder or "<v>")
    pattern = (rf"an? (?:({words(RADII)}) )?(?:({words(APPEARANCES)}|{v}) |(?:({words(OBJECT_COLOURS)}) )?"
               rf"(?:and ({words(OBJECT_COLOURS)}) )?(?:({words(PATTERNS)}) )?)({words(SHAPES)})"
               rf"(?: ({words(_PHRASE)}))?(?: on an? ({words(BACKGROUNDS)}) background)?"
               rf"(?: next to an? ({words(OBJECT_COLOURS)}) ({words(SHAPES)}))?")
    m = re.fullmatch(pattern, text.strip())
    # a pattern in colours names both ("red and white striped"), a plain colour names one
    if m is None or bool(m.group(4)) != bool(m.group(3) and m.group(5)):
        raise ValueError(f"{text!r} is not a caption of the third shapes world's grammar")
    size, word, colour, colour2, fill, shape, phrase, background, colour_b, shape_b = m.groups()
    if word in APPEARANCES:
        main = Thing(shape, appearance=word)
    elif colour:
        main = Thing(shape, colour, pattern=fill, colour2=colour2)
    elif word or (concept and not fill):
        main = Thing(shape, concept=concept)
    else:
        main = Thing(shape, pattern=fill)
    return Scene(main, size, _PHRASE.get(phrase), background, Thing(shape_b, colour_b) if shape_b else None)


def floor_captions(concept):
    """What a user could write for a concept: its category alone, each appearance word, and the concept's
    pattern word in the palette colours nearest its two (the control, no appearance word's: a border in purple
    and white-ish)."""
    category, _, word, colours = CONCEPTS[concept]
    near = lambda rgb: sorted(OBJECT_COLOURS, key=lambda n: np.linalg.norm(np.subtract(rgb, COLOURS[n])))[:2]  # noqa: E731
    pattern = APPEARANCES[word][0] if word else "bordered"
    a, b = colours or ((140, 50, 180), (250, 250, 250))
    return ([category] + [f"{w} {category}" for w in APPEARANCES]
            + [f"{x} and {y} {pattern} {category}" for x, y in product(near(a), near(b)) if x != y])


def caption_floor(pipe, concepts, n=8, seed=0, steps=25, cfg=7.5):
    """{concept: {"caption": the best, "best caption": its identity, "category word": the category's,
    "captions tried": {caption: identity}}}: n images of "a big {caption} ..." per caption, on the
    backgrounds and positions of `n` photos of the concept (not the benchmark's scenes)."""
    from attndreambooth.inference.sampling import sample_prompts
    out = {}
    for concept in concepts:
        rng = random.Random(f"floor-{concept}-{seed}")
        scenes = [random_scene(rng, second_prob=0, concept=concept) for _ in range(n)]
        tried = {}
        for words in floor_captions(concept):
            prompts = [sc.caption("{}", omit=("size",)).replace("{} " + sc.main.shape, "big " + words) for sc in scenes]
            tried[words] = float(np.mean([identity(im, concept) for _, ims, _ in sample_prompts(
                pipe, prompts, 1, seed, n, steps=steps, guidance_scale=cfg) for im in ims]))
        best = max(tried, key=tried.get)
        out[concept] = {"caption": best, "best caption": tried[best], "category word": tried[CONCEPTS[concept][0]],
                        "captions tried": tried}
    return out


def write_photos(folder=DATA, n=5):
    """Each concept's `n` photos as PNG files in folder/<concept>/ (the shipped DATA is this, n = 5)."""
    for concept in CONCEPTS:
        (Path(folder) / concept).mkdir(parents=True, exist_ok=True)
        for i, (_, image) in enumerate(concept_photos(concept, n)):
            image.save(Path(folder) / concept / f"{concept}_{i}.png")
