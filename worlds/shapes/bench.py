"""The first shapes world as the comparison uses it (worlds/__init__.py says what a world names): its concepts'
photos, its base model, its readers, and the inverse of its captions."""
import re
from pathlib import Path

from worlds.shapes.read import alignment, blobs, identity
from worlds.shapes.scene import (BACKGROUNDS, CONCEPTS, OBJECT_COLOURS, PATTERNS, PHRASES, RADII, SHAPES, Scene, Thing,
                                 random_scene)
from worlds.shapes.world_report import caption_floor

__all__ = ["NAME", "CONCEPTS", "DATA", "MODEL", "MODEL_WORDS", "SAMPLER_STEPS", "random_scene", "parse_caption",
           "alignment", "identity", "blobs", "caption_floor"]  # what a world names (worlds/__init__.py)
NAME = "shapes"
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "shapes"  # each concept's five photos
MODEL = ROOT / "models" / "shapes_v1"  # the first world's model (models/shapes is the third world's)
MODEL_WORDS = ()  # its models share the grammar's words with every world's
SAMPLER_STEPS = 15  # its metrics at 25 steps were within run-to-run noise (docs/reports/shapes_comparison.md)
_PHRASE = {v: k for k, v in PHRASES.items()}


def parse_caption(text, placeholder="<v>", concept=None):
    """The Scene a caption of the grammar describes, attributes it leaves out None ("a <v> star on a blue
    background", "a striped star"). The main object is `concept` when the caption writes "[V] category", or
    the category with no colour ("a big star ...", the base model's reference for the concept)."""
    words = "|".join
    pattern = (rf"an? (?:({words(RADII)}) )?(?:({words(OBJECT_COLOURS)}|{re.escape(placeholder or '<v>')}) )?"
               rf"(?:and ({words(OBJECT_COLOURS)}) )?(?:({words(PATTERNS)}) )?"
               rf"({words(SHAPES)})(?: ({words(_PHRASE)}))?(?: on an? ({words(BACKGROUNDS)}) background)?"
               rf"(?: next to an? ({words(OBJECT_COLOURS)}) ({words(SHAPES)}))?")
    m = re.fullmatch(pattern, text.strip())
    if m is None or (m.group(3) and not m.group(4)) or (m.group(4) and m.group(2) and not m.group(3)):
        raise ValueError(f"{text!r} is not a caption of the shapes world's grammar")
    size, colour, colour2, fill, shape, phrase, background, colour_b, shape_b = m.groups()
    if colour in OBJECT_COLOURS:
        main = Thing(shape, colour, pattern=fill, colour2=colour2)
    elif colour is not None or concept is not None:
        main = Thing(shape, None, concept)
    else:
        main = Thing(shape, None, pattern=fill)
    return Scene(main, size, _PHRASE.get(phrase), background, Thing(shape_b, colour_b) if shape_b else None)

