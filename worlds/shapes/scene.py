"""Scenes of the shapes world: a grammar of captions and a deterministic renderer (64x64 RGB).

"a small red and white striped star on the left on a blue background next to a yellow circle": a shape
of one of 6 categories, plain in one of 8 colours or patterned (striped, checkered, dotted, halved,
bordered) in two of them, small or big, at one of 5 positions, on one of 6 background colours,
optionally with a small plain second object at the opposite position. The pattern words give an
embedding something to reach for, as SD's vocabulary does: each personal concept is a held-out
combination (a pattern in colours off the caption palette, or a pattern no word names) that never
appears in pretraining and that no caption names.
"""
import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SIZE, SUPER = 64, 4  # image side; supersampling factor for anti-aliased edges
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
           "blue": (40, 80, 220), "purple": (140, 50, 180), "pink": (245, 130, 190), "white": (245, 245, 245),
           "black": (20, 20, 20), "gray": (128, 128, 128), "brown": (130, 80, 40)}
OBJECT_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
BACKGROUNDS = ("black", "gray", "white", "blue", "green", "brown")
POSITIONS = {"left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46), "centre": (32, 32)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "centre": "in the centre"}
SECOND_AT = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "centre": "corner"}
CORNER = (12, 12)  # where the second object goes when the first is in the centre
RADII = {"small": 7.0, "big": 12.0}
OMITTABLE = ("size", "colour", "position", "background")  # what a caption may leave unsaid
PATTERNS = ("striped", "checkered", "dotted", "halved", "bordered")
SYMMETRIC = ("striped", "checkered")  # their two colours play the same part: compared as a set
WORDS = ("a an and on the left right at top bottom in centre next to background small big"
         .split() + list(SHAPES) + list(COLOURS) + list(PATTERNS))


def pattern_mask(pattern, u, v):
    """Where a pattern takes its second colour, over unit coordinates (u, v: centre 0, radius 1, y down):
    diagonal stripes, cells of half a radius, a dot in the middle, the right half, a border."""
    if pattern == "striped":
        return np.floor((u + v) * 1.5) % 2 == 1
    if pattern == "checkered":
        return (np.floor(u * 2) + np.floor(v * 2)) % 2 == 1
    if pattern == "dotted":
        return u ** 2 + (v + 0.05) ** 2 < 0.3 ** 2
    if pattern == "halved":
        return u >= 0
    if pattern == "bordered":
        return np.maximum(abs(u), abs(v)) > 0.55
    raise ValueError(f"unknown pattern {pattern!r}; one of {PATTERNS}")


def outline(shape, n=64):
    """The shape's polygon in unit coordinates (centre 0, radius 1, y down), or None for the circle."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0, -1), (0.866, 0.6), (-0.866, 0.6)]
    if shape == "diamond":
        return [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    if shape == "star":
        return [((1 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                 -(1 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "heart":
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in np.linspace(0, 2 * math.pi, n, endpoint=False)]
        return [(x / 17, (y + 2.5) / 17) for x, y in pts]
    return None


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _pattern_checker(u, v):  # orange-teal checkerboard, cells of half a radius (teal is no caption colour)
    return np.where(pattern_mask("checkered", u, v)[..., None], (40, 190, 170), (245, 140, 20))


def _pattern_split(u, v):  # left half magenta, right half lime (neither is a caption colour)
    return np.where(pattern_mask("halved", u, v)[..., None], (150, 230, 40), (230, 40, 160))


def _pattern_dot(u, v):  # a crimson heart with a cream dot inside (red and white are caption colours)
    return np.where(pattern_mask("dotted", u, v)[..., None], (255, 235, 160), (200, 20, 90))


def _pattern_stripes(u, v):  # a purple square with a border of black and white stripes (no word says it)
    border = np.maximum(abs(u), abs(v)) > 0.55
    stripe = np.floor((u + v) * 3) % 2 == 0
    return np.where(border[..., None], np.where(stripe[..., None], (250, 250, 250), (20, 20, 20)), (140, 50, 180))


# name -> (category, pattern over unit coordinates); names are folder names, never caption words
CONCEPTS = {"checker_star": ("star", _pattern_checker), "split_circle": ("circle", _pattern_split),
            "dot_heart": ("heart", _pattern_dot), "stripe_square": ("square", _pattern_stripes)}
# what a user describing a concept in the grammar's words would reach for: the nearest pattern word and the
# concept's two colours (the part outside the pattern's mask first; stripe_square's striped border has no word)
DESCRIBED = {"checker_star": ("checkered", (245, 140, 20), (40, 190, 170)),
             "split_circle": ("halved", (230, 40, 160), (150, 230, 40)),
             "dot_heart": ("dotted", (200, 20, 90), (255, 235, 160)),
             "stripe_square": ("bordered", (140, 50, 180), (250, 250, 250))}


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: Optional[str]  # None for a concept (its pattern is its colour), or when a caption leaves it out
    concept: Optional[str] = None
    pattern: Optional[str] = None  # one of PATTERNS, in `colour` and `colour2`; None: plain
    colour2: Optional[str] = None

    def fill_words(self):
        """How a caption paints it: "red", "red and white striped", "striped" (colours left out)."""
        colours = [c for c in (self.colour, self.colour2) if c]
        return " ".join([" and ".join(colours)] * bool(colours) + [self.pattern] * bool(self.pattern))

    def wanted_pattern(self):
        """The pattern a caption asks for: its pattern word, "plain" for a plain colour, None if unsaid."""
        return self.pattern or ("plain" if self.colour and not self.concept else None)

    def wanted_colours(self):
        """The colours a caption asks for: a name, a pair (ordered unless the pattern is SYMMETRIC), or None."""
        if self.colour is None or self.concept:
            return None
        if self.pattern is None:
            return self.colour
        pair = (self.colour, self.colour2)
        return frozenset(pair) if self.pattern in SYMMETRIC else pair


@dataclass(frozen=True)
class Scene:
    main: Thing
    size: Optional[str]  # None (here and below): a caption that leaves it out (not renderable)
    position: Optional[str]
    background: Optional[str]
    second: Optional[Thing] = None

    def caption(self, placeholder=None, omit=()):
        """The caption; a concept is written "[V] category" with `placeholder` ("<v> star"). `omit` leaves out
        any of "size", "colour", "position", "background" ("a star on a blue background"), as real captions
        leave things unsaid (as does an attribute that is None); the second object is always named when there
        is one."""
        m, words = self, []
        if "size" not in omit and m.size:
            words.append(m.size)
        if m.main.concept:
            words.append(placeholder)
        elif "colour" not in omit:
            words.append(m.main.fill_words())
        elif m.main.pattern:
            words.append(m.main.pattern)
        words.append(m.main.shape)
        if "position" not in omit and m.position:
            words.append(PHRASES[m.position])
        if "background" not in omit and m.background:
            words.append(f"on a {m.background} background")
        words = [w for w in words if w]
        text = f"{_article(words[0])} " + " ".join(words)
        if self.second:
            text += f" next to {_article(self.second.colour)} {self.second.colour} {self.second.shape}"
        return text

    def attributes(self):
        """The attributes a caption asks for, the concept's identity excepted: name -> wanted value."""
        out = dict(shape=self.main.shape, size=self.size, position=self.position, background=self.background,
                   colour=self.main.wanted_colours(), pattern=self.main.wanted_pattern())
        out = {k: v for k, v in out.items() if v is not None}  # what a caption leaves out is not asked for
        out["second"] = None if self.second is None else (self.second.shape, self.second.colour)
        return out

    def render(self, seed=0):
        return render(self, seed)


def random_scene(rng: random.Random, second_prob=0.4, concept=None, pattern_prob=0.5):
    """A scene drawn from the grammar (the main object is `concept` if given): plain or, with `pattern_prob`,
    in one of the patterns (uniform) and two colours, none of them the background's."""
    background = rng.choice(BACKGROUNDS)
    if concept:
        main = Thing(CONCEPTS[concept][0], None, concept)
    else:
        shape, colours = rng.choice(SHAPES), [c for c in OBJECT_COLOURS if c != background]
        if rng.random() < pattern_prob:
            a, b = rng.sample(colours, 2)
            main = Thing(shape, a, pattern=rng.choice(PATTERNS), colour2=b)
        else:
            main = Thing(shape, rng.choice(colours))
    second = None
    if rng.random() < second_prob:
        second = Thing(rng.choice(SHAPES), rng.choice([c for c in OBJECT_COLOURS if c != background]))
    return Scene(main, rng.choice(tuple(RADII)), rng.choice(tuple(POSITIONS)), background, second)


def _fill(thing):
    """A thing's paint: its concept's pattern, its pattern in its two colours, or its colour."""
    if thing.concept:
        return CONCEPTS[thing.concept][1]
    if thing.pattern:
        a, b = np.array(COLOURS[thing.colour]), np.array(COLOURS[thing.colour2])
        return lambda u, v: np.where(pattern_mask(thing.pattern, u, v)[..., None], b, a)
    return COLOURS[thing.colour]


def _draw(canvas, shape, fill, centre, radius):
    """Paint `shape` on the supersampled canvas (H, W, 3 float) at `centre` (pixels) with `radius`, in `fill`
    (an RGB colour, or a pattern over unit coordinates u, v -> colours); only the window around the object
    is touched."""
    s, (cx, cy), r = SUPER, centre, radius
    x0, y0 = max(int((cx - r - 1) * s), 0), max(int((cy - r - 1) * s), 0)
    x1, y1 = min(int((cx + r + 1) * s) + 1, SIZE * s), min(int((cy + r + 1) * s) + 1, SIZE * s)
    if x1 <= x0 or y1 <= y0:
        return
    mask_img = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(mask_img)
    poly = outline(shape)
    if poly is None:
        draw.ellipse([(cx - r) * s - x0, (cy - r) * s - y0, (cx + r) * s - x0, (cy + r) * s - y0], fill=255)
    else:
        draw.polygon([((cx + x * r) * s - x0, (cy + y * r) * s - y0) for x, y in poly], fill=255)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255
    if callable(fill):
        ys, xs = np.mgrid[y0:y1, x0:x1]
        u, v = ((xs + 0.5) / s - cx) / r, ((ys + 0.5) / s - cy) / r
        colour = fill(u, v).astype(np.float32)
    else:
        colour = np.array(fill, np.float32)
    window = canvas[y0:y1, x0:x1]
    window *= 1 - mask
    window += mask * colour


def render(scene, seed=0):
    """The scene as a 64x64 RGB image; `seed` jitters positions by up to 2 px."""
    rng = random.Random(seed)
    s = SUPER
    canvas = np.empty((SIZE * s, SIZE * s, 3), np.float32)
    canvas[:] = COLOURS[scene.background]
    jitter = lambda xy, j: (xy[0] + rng.uniform(-j, j), xy[1] + rng.uniform(-j, j))  # noqa: E731
    _draw(canvas, scene.main.shape, _fill(scene.main), jitter(POSITIONS[scene.position], 2), RADII[scene.size])
    if scene.second:
        where = SECOND_AT[scene.position]
        centre = jitter(CORNER if where == "corner" else POSITIONS[where], 1)
        _draw(canvas, scene.second.shape, _fill(scene.second), centre, RADII["small"])
    small = canvas.reshape(SIZE, s, SIZE, s, 3).mean(axis=(1, 3))  # box filter: anti-aliased edges
    return Image.fromarray(small.round().clip(0, 255).astype(np.uint8))


def draw_thing(thing, centre, radius, background=(0, 0, 0)):
    """One object alone at `centre` (pixels, fractional) with `radius`, as a 64x64 RGB image."""
    canvas = np.empty((SIZE * SUPER, SIZE * SUPER, 3), np.float32)
    canvas[:] = background
    _draw(canvas, thing.shape, _fill(thing), centre, radius)
    small = canvas.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3))
    return Image.fromarray(small.round().clip(0, 255).astype(np.uint8))


def concept_photos(concept, n=5, seed=0):
    """`n` "photos" of a concept: different sizes and positions on plain backgrounds, no second object."""
    rng = random.Random(f"{concept}-{seed}")
    scenes = [random_scene(rng, second_prob=0, concept=concept) for _ in range(n)]
    return [(sc, sc.render(seed=rng.randrange(2**31))) for sc in scenes]
