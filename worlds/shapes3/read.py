"""Reading a third-world image from its pixels: the first world's segmentation, shapes and positions
(worlds.shapes.read), with this world's sizes, patterns and colours. An object's fill is read as
("plain" or a pattern, its two colours as RGB); a caption's colours are met by palette names (the nearest
palette colour) or, for an appearance word, by RGB within COLOUR_TOLERANCE of what the word draws."""
import numpy as np

from worlds.shapes import read as first
from worlds.shapes.read import blobs, nearest, position_of, shape_of
from worlds.shapes.scene import OBJECT_COLOURS
from worlds.shapes3.scene import CONCEPTS, PATTERNS, RADII, SEPARATION, SYMMETRIC, Thing, draw_thing, pattern_mask

COLOUR_TOLERANCE = 60.0  # RGB distance within which a read colour meets an appearance word's


def size_of(blob):
    """small or big by the bounding box's longer side: at most 2 radii + 1 px for a small object (19 px), at
    least 1.6 radii for a big one (22.4 px)."""
    x0, y0, x1, y1 = blob.bbox
    return "big" if max(x1 - x0, y1 - y0) > (2 * RADII["small"] + 1 + 1.6 * RADII["big"]) / 2 else "small"


def fill_of(image, blob, shape):
    """("plain", (rgb, rgb)) or (pattern, (rgb outside its mask, rgb on it)): the eroded interior split in two
    colours; a pattern when they differ and each covers enough of it, the one whose mask (this world's, at the
    object's fitted centre and radius over sub-pixel shifts) agrees best with the split. Two colours closer than
    SEPARATION with one palette name are one colour shaded (no pattern of the world has such a pair: palette
    patterns name two colours, an appearance's are further apart), as the first world reads them."""
    a = np.asarray(image.convert("RGB"), np.float32)
    inner = first._erode(blob.mask)
    if inner.sum() < first.MIN_INTERIOR:
        inner = blob.mask
    pixels = a[inner]
    labels, c0, c1 = first._two_means(pixels)
    share = labels.mean()
    contrast = np.linalg.norm(c0 - c1)
    shaded = contrast < SEPARATION and nearest(c0, OBJECT_COLOURS) == nearest(c1, OBJECT_COLOURS)
    if contrast < first.MIN_CONTRAST or min(share, 1 - share) < first.MIN_SHARE or shaded:
        rgb = tuple(np.median(pixels, axis=0).tolist())
        return "plain", (rgb, rgb)
    pattern, sign = first.best_pattern(blob, shape, inner, labels, PATTERNS, pattern_mask)
    pair = (tuple(c0.tolist()), tuple(c1.tolist()))
    return pattern, pair if sign > 0 else pair[::-1]


def describe(image):
    """Background and, per object (largest first): shape, pattern, colours (RGB pair), size, position."""
    objects = []
    for b in blobs(image):
        shape = shape_of(b)
        pattern, rgb = fill_of(image, b, shape)
        objects.append(dict(shape=shape, pattern=pattern, rgb=rgb, size=size_of(b), position=position_of(b),
                            blob=b))
    return dict(background=first.background(image)[0], objects=objects)


def wanted(scene):
    """What a caption asks for: name -> value; what it leaves out is absent. colour: a palette name (plain), a
    pair of names, or a pair of RGB (an appearance word)."""
    m, out = scene.main, dict(shape=scene.main.shape, size=scene.size, position=scene.position,
                              background=scene.background)
    if m.appearance:
        pattern, rgb = m.look()
        out.update(pattern=pattern, colour=rgb)
    elif m.colour and not m.concept:
        out.update(pattern=m.pattern or "plain", colour=(m.colour, m.colour2) if m.pattern else m.colour)
    elif m.pattern:
        out.update(pattern=m.pattern)
    out = {k: v for k, v in out.items() if v is not None}
    out["second"] = None if scene.second is None else (scene.second.shape, scene.second.colour)
    return out


def colours_match(obj, pattern, want):
    """Whether an object's read colours meet a caption's (pairs of SYMMETRIC patterns as sets)."""
    if isinstance(want, str):
        return obj["pattern"] == "plain" and nearest(obj["rgb"][0], OBJECT_COLOURS) == want
    if obj["pattern"] != pattern:
        return False
    if isinstance(want[0], str):
        seen = tuple(nearest(c, OBJECT_COLOURS) for c in obj["rgb"])
        return set(seen) == set(want) if pattern in SYMMETRIC else seen == tuple(want)
    close = lambda pair: all(np.linalg.norm(np.subtract(s, w)) < COLOUR_TOLERANCE  # noqa: E731
                             for s, w in zip(pair, want))
    return close(obj["rgb"]) or (pattern in SYMMETRIC and close(obj["rgb"][::-1]))


def _plain_named(obj):
    return obj["pattern"] == "plain" and (obj["shape"], nearest(obj["rgb"][0], OBJECT_COLOURS))


def match_objects(seen, want):
    """(main, second): the object agreeing best on shape, pattern and position; the other object with the
    second's shape and colour, else the largest other one (None if none)."""
    objects = seen["objects"]
    ranked = sorted(objects, key=lambda o: -((o["shape"] == want["shape"]) * 2 + (o["pattern"] == want.get("pattern"))
                                              + (o["position"] == want.get("position"))))
    main = ranked[0] if ranked else None
    others = [o for o in objects if o is not main]
    named = [o for o in others if want["second"] and _plain_named(o) == want["second"]]
    return main, (named or others or [None])[0]


def alignment(image, scene, seen=None):
    """(fraction of the caption's attributes met, {attribute: met}); the concept's identity is not one."""
    seen = seen or describe(image)
    want = wanted(scene)
    main, second = match_objects(seen, want)
    checks = {k: seen["background"] == want[k] for k in ("background",) if k in want}
    for key in ("shape", "colour", "pattern", "size", "position"):
        if key not in want:
            continue
        if main is None:
            checks[key] = False
        elif key == "colour":
            checks[key] = colours_match(main, want.get("pattern", "plain"), want["colour"])
        else:
            checks[key] = main[key] == want[key]
    checks["second"] = (second is None) if want["second"] is None else (
        second is not None and _plain_named(second) == want["second"])
    return sum(checks.values()) / len(checks), checks


def identity(image, concept, blob=None):
    """R^2 of the concept's render (fitted to the object's mask, refined over small shifts) over the object's
    interior, clipped at 0: the first world's measure with this world's concepts."""
    found = blobs(image) if blob is None else [blob]
    if not found:
        return 0.0
    return first.fitted_r2(image, found[0], Thing(CONCEPTS[concept][0], concept=concept), draw_thing)
