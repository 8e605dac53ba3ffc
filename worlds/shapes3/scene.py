"""Scenes of the third shapes world: captions as (word, role) tokens and a deterministic 64x64 renderer.

"a big harlequin star on the left on a blue background next to a yellow circle": the first world's shapes,
palette, backgrounds and positions, with bigger objects (radius 9 or 14 px, not 7 or 12) and coarser patterns
(cells, bands and dots of about half a radius or more), so that every feature a caption names survives a VAE
that downsamples 4x. Beside the palette's colour and pattern words there are *appearance words*: one word for a
pattern in two colours ("harlequin": a checkerboard), whose colours vary in pretraining around the word's own
(up to SPREAD per channel) while an offset on the word's token embedding, used by pretraining only, says by how
much. That gives a single token a route to colours no word names, which is what a learned embedding needs: three
personal concepts sit inside an appearance word's range (never drawn in pretraining), the fourth (a striped
border) is the control no single word reaches.
"""
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from worlds.shapes.scene import (BACKGROUNDS, COLOURS, OBJECT_COLOURS, PHRASES, POSITIONS, SECOND_AT,
                                               SHAPES, SIZE, SUPER, _draw)

RADII = {"small": 9.0, "big": 14.0}
CORNER = (11, 11)  # where the second object goes when the first is in the centre
PATTERNS = ("striped", "checkered", "dotted", "halved", "bordered")
SYMMETRIC = ("striped", "checkered")  # their two colours play the same part: compared as a set
SPREAD = 80  # an appearance word's colours vary by up to this much per channel in pretraining
SEPARATION = 90  # an appearance's two colours differ by more (RGB), and each from the background
# word -> (pattern, its colour outside the pattern's mask, its colour on it); each base colour is about 95 (RGB)
# from the concept it leads to, so the word alone draws that concept's pattern in the wrong colours
APPEARANCES = {"harlequin": ("checkered", (190, 85, 75), (95, 135, 115)),
               "jester": ("halved", (175, 95, 105), (95, 175, 95)),
               "ladybug": ("dotted", (145, 75, 145), (200, 180, 105)),
               "zebra": ("striped", (70, 70, 90), (190, 190, 170))}
FUNCTION_WORDS = ("a", "an", "and", "on", "the", "at", "in", "next", "to")
WORDS = (FUNCTION_WORDS + ("left", "right", "top", "bottom", "centre", "background", "small", "big") + SHAPES
         + tuple(COLOURS) + PATTERNS + tuple(APPEARANCES))
OMITTABLE = ("size", "colour", "position", "background")  # what a short caption may leave unsaid


def pattern_mask(pattern, u, v):
    """Where a pattern takes its second colour, over unit coordinates (u, v: centre 0, radius 1, y down):
    diagonal bands 0.7 radius wide, cells of 2/3 radius, a dot of 0.45 radius, the right half, a border
    outside the middle 0.9-radius square."""
    if pattern == "striped":
        return np.floor(u + v) % 2 == 1
    if pattern == "checkered":
        return (np.floor(u * 1.5) + np.floor(v * 1.5)) % 2 == 1
    if pattern == "dotted":
        return u ** 2 + (v + 0.05) ** 2 < 0.45 ** 2
    if pattern == "halved":
        return u >= 0
    if pattern == "bordered":
        return np.maximum(abs(u), abs(v)) > 0.45
    raise ValueError(f"unknown pattern {pattern!r}; one of {PATTERNS}")


def _two_colour(pattern, a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return lambda u, v: np.where(pattern_mask(pattern, u, v)[..., None], b, a)


def _striped_border(u, v):  # purple inside, a border of black and white bands: no word says it
    stripes = np.where((np.floor((u + v) * 1.5) % 2 == 0)[..., None], (250, 250, 250), (20, 20, 20))
    return np.where((np.maximum(abs(u), abs(v)) > 0.45)[..., None], stripes, (140, 50, 180))


# name -> (category, fill over unit coordinates, the appearance word whose range holds it or None, its colours)
CONCEPTS = {
    "checker_star": ("star", _two_colour("checkered", (245, 140, 20), (40, 190, 170)), "harlequin",
                     ((245, 140, 20), (40, 190, 170))),
    "split_circle": ("circle", _two_colour("halved", (230, 40, 160), (150, 230, 40)), "jester",
                     ((230, 40, 160), (150, 230, 40))),
    "dot_heart": ("heart", _two_colour("dotted", (200, 20, 90), (255, 235, 160)), "ladybug",
                  ((200, 20, 90), (255, 235, 160))),
    "stripe_square": ("square", _striped_border, None, None),
}
HELD_OUT = 40.0  # pretraining never draws a concept's category in its word within this distance of its colours


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: Optional[str] = None  # a palette name: the plain colour, or a pattern's first colour
    pattern: Optional[str] = None  # one of PATTERNS, in colour and colour2
    colour2: Optional[str] = None
    appearance: Optional[str] = None  # an appearance word; its colours are its base plus `offset`
    offset: tuple = ()  # 6 ints in [-SPREAD, SPREAD]: the two colours' shift from the word's base
    concept: Optional[str] = None

    def look(self):
        """(pattern or "plain", (RGB, RGB)) as drawn; None for a concept."""
        if self.concept:
            return None
        if self.appearance:
            pattern, a, b = APPEARANCES[self.appearance]
            shifted = np.clip(np.add((*a, *b), self.offset or (0,) * 6), 0, 255)
            return pattern, (tuple(shifted[:3].tolist()), tuple(shifted[3:].tolist()))
        if self.pattern:
            return self.pattern, (COLOURS[self.colour], COLOURS[self.colour2])
        return "plain", (COLOURS[self.colour],) * 2

    def fill(self):
        if self.concept:
            return CONCEPTS[self.concept][1]
        pattern, (a, b) = self.look()
        return a if pattern == "plain" else _two_colour(pattern, a, b)


@dataclass(frozen=True)
class Scene:
    main: Thing
    size: Optional[str]  # None here and below: left unsaid (a caption's reading; not renderable)
    position: Optional[str]
    background: Optional[str]
    second: Optional[Thing] = None

    def tokens(self, placeholder=None, omit=()):
        """The caption as [(word, role)], role one of: fn, size, colour, pattern, appearance, placeholder,
        noun, position, background, bg_colour, second_colour, second_noun. `omit` leaves out any of OMITTABLE
        (leaving out the colour of an appearance leaves out its word; a pattern word stays)."""
        m, out = self.main, []
        if "size" not in omit and self.size:
            out.append((self.size, "size"))
        if m.concept:
            out.append((placeholder, "placeholder"))
        elif m.appearance:
            out += [] if "colour" in omit else [(m.appearance, "appearance")]
        else:
            if m.colour and "colour" not in omit:
                out.append((m.colour, "colour"))
                if m.colour2:
                    out += [("and", "fn"), (m.colour2, "colour")]
            if m.pattern:
                out.append((m.pattern, "pattern"))
        out.append((m.shape, "noun"))
        if "position" not in omit and self.position:
            out += [(w, "fn") for w in PHRASES[self.position].split()[:-1]] + [(self.position, "position")]
        if "background" not in omit and self.background:
            out += [("on", "fn"), ("a", "fn"), (self.background, "bg_colour"), ("background", "background")]
        if self.second:
            out += [("next", "fn"), ("to", "fn"), (_article(self.second.colour), "fn"),
                    (self.second.colour, "second_colour"), (self.second.shape, "second_noun")]
        first = out[0][0] if out[0][0] != placeholder else "v"
        return [(_article(first), "fn")] + out

    def caption(self, placeholder=None, omit=()):
        return " ".join(w for w, _ in self.tokens(placeholder, omit))

    def render(self, seed=0):
        return render(self, seed)


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _near(rgb, others, distance):
    return any(np.linalg.norm(np.subtract(rgb, o)) < distance for o in others)


def stands_out(thing, background):
    """Whether an appearance's two colours differ from the background and from each other by more than
    SEPARATION, as every appearance the world draws does (nearer the background, the readers' segmentation loses
    the colour)."""
    _, (a, b) = thing.look()
    return not (_near(a, [COLOURS[background]], SEPARATION) or _near(b, [COLOURS[background], a], SEPARATION))


def random_appearance(rng, shape, background):
    """An appearance word and an offset whose colours stand out from the background and from each other (by more
    than SEPARATION), outside every concept's held-out neighbourhood."""
    word = rng.choice(tuple(APPEARANCES))
    while True:
        thing = Thing(shape, appearance=word, offset=tuple(rng.randint(-SPREAD, SPREAD) for _ in range(6)))
        if not stands_out(thing, background):
            continue
        _, (a, b) = thing.look()
        held = [c for c in CONCEPTS.values() if c[0] == shape and c[2] == word]
        if any(np.linalg.norm(np.subtract(a, ca)) < HELD_OUT and np.linalg.norm(np.subtract(b, cb)) < HELD_OUT
               for *_, (ca, cb) in held):
            continue
        return thing


def random_scene(rng: random.Random, second_prob=0.4, concept=None, kinds=(0.4, 0.35, 0.25)):
    """A scene of the grammar (its main object `concept` if given, else plain, patterned in two palette colours
    or an appearance word, with chances `kinds`); no object colour is the background's."""
    background = rng.choice(BACKGROUNDS)
    colours = [c for c in OBJECT_COLOURS if c != background]
    shape, kind = rng.choice(SHAPES), rng.random()
    if concept:
        main = Thing(CONCEPTS[concept][0], concept=concept)
    elif kind < kinds[0]:
        main = Thing(shape, rng.choice(colours))
    elif kind < kinds[0] + kinds[1]:
        a, b = rng.sample(colours, 2)
        main = Thing(shape, a, pattern=rng.choice(PATTERNS), colour2=b)
    else:
        main = random_appearance(rng, shape, background)
    second = Thing(rng.choice(SHAPES), rng.choice(colours)) if rng.random() < second_prob else None
    return Scene(main, rng.choice(tuple(RADII)), rng.choice(tuple(POSITIONS)), background, second)


def _centres(scene, rng):
    jitter = lambda xy, j: (xy[0] + rng.uniform(-j, j), xy[1] + rng.uniform(-j, j))  # noqa: E731
    main = jitter(POSITIONS[scene.position], 2)
    where = SECOND_AT[scene.position]
    return main, jitter(CORNER if where == "corner" else POSITIONS[where], 1)


def render(scene, seed=0):
    """The scene as a 64x64 RGB image, objects drawn at 4x and box-filtered; `seed` jitters positions."""
    canvas = np.empty((SIZE * SUPER, SIZE * SUPER, 3), np.float32)
    canvas[:] = COLOURS[scene.background]
    main, second = _centres(scene, random.Random(seed))
    _draw(canvas, scene.main.shape, scene.main.fill(), main, RADII[scene.size])
    if scene.second:
        _draw(canvas, scene.second.shape, scene.second.fill(), second, RADII["small"])
    small = canvas.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3))
    return Image.fromarray(small.round().clip(0, 255).astype(np.uint8))


def object_masks(scene, seed=0):
    """(main, second or None): each object's coverage (64, 64) in [0, 1], as `render(scene, seed)` draws them
    (the attention gates' ground truth)."""
    main, second = _centres(scene, random.Random(seed))
    out = []
    for thing, centre, r in ((scene.main, main, RADII[scene.size]), (scene.second, second, RADII["small"])):
        if thing is None:
            out.append(None)
            continue
        canvas = np.zeros((SIZE * SUPER, SIZE * SUPER, 3), np.float32)
        _draw(canvas, thing.shape, (1.0, 1.0, 1.0), centre, r)
        out.append(canvas[..., 0].reshape(SIZE, SUPER, SIZE, SUPER).mean(axis=(1, 3)))
    return tuple(out)


def draw_thing(thing, centre, radius, background=(0, 0, 0)):
    """One object alone at `centre` (pixels, fractional) with `radius`, as a 64x64 RGB image."""
    canvas = np.empty((SIZE * SUPER, SIZE * SUPER, 3), np.float32)
    canvas[:] = background
    _draw(canvas, thing.shape, thing.fill(), centre, radius)
    small = canvas.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3))
    return Image.fromarray(small.round().clip(0, 255).astype(np.uint8))


def concept_photos(concept, n=5, seed=0):
    """`n` "photos" of a concept: sizes, positions and backgrounds varied, no second object."""
    rng = random.Random(f"{concept}-{seed}")
    scenes = [random_scene(rng, second_prob=0, concept=concept) for _ in range(n)]
    return [(sc, sc.render(seed=rng.randrange(2**31))) for sc in scenes]
