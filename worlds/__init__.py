"""Procedural worlds with exact metrics, beside the trainer: they import it, it never imports them.

A world, as the comparison uses it (worlds/comparison.py, worlds/scoring.py, `scripts/sweep.py --world NAME`,
`scripts/evaluate.py --world NAME`), is its module `worlds.<NAME>.bench`, which names: NAME; CONCEPTS (concept ->
(category, ...)); DATA (a folder of each concept's photos); MODEL (the world's base model folder); MODEL_WORDS
(words a model of the world has a token for and another world's has not); SAMPLER_STEPS (the comparison's
sampler steps per image); random_scene(rng, second_prob,
concept); parse_caption(text, placeholder, concept), the inverse of its scenes' captions; its readers
alignment(image, scene), identity(image, concept) and blobs(image); and caption_floor(pipe, concepts, steps),
the best description a user could write of each concept."""
import importlib

WORLDS = ("shapes", "shapes3")  # the first shapes world; the third (worlds/shapes3)


def load(name):
    """The world called `name` (its bench module)."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; one of {', '.join(WORLDS)}")
    return importlib.import_module(f"worlds.{name}.bench")
