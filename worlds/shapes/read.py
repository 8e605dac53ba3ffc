"""Reading a shapes-world image exactly, from its pixels: the background colour, the objects
(segmented against the background), each object's shape, fill (plain colour, or pattern and two
colours), size and position, a concept's identity score, and the text alignment of an image with its
scene's caption."""
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from worlds.shapes.scene import (BACKGROUNDS, COLOURS, CONCEPTS, CORNER, OBJECT_COLOURS, PATTERNS, POSITIONS, RADII, SHAPES, Scene, Thing, draw_thing, pattern_mask, render)

CANON = 20  # side of the normalised object crops that shapes are compared at
MIN_AREA = 10  # pixels; smaller specks are noise


@dataclass
class Blob:
    mask: np.ndarray  # (64, 64) bool
    area: int
    centroid: tuple  # (x, y)
    bbox: tuple  # (x0, y0, x1, y1), exclusive end


def nearest(rgb, names):
    """The palette colour name closest to `rgb`."""
    return min(names, key=lambda n: sum((a - b) ** 2 for a, b in zip(rgb, COLOURS[n])))


def background(image):
    """(name, rgb) of the background: the median of the border pixels, named by the nearest palette colour."""
    a = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    rgb = np.median(border, axis=0)
    return nearest(rgb, BACKGROUNDS), rgb


def blobs(image, threshold=60.0):
    """Objects: 4-connected regions of pixels farther than `threshold` (RGB distance) from the background,
    largest first."""
    a = np.asarray(image.convert("RGB"), np.float32)
    fg = _close(np.linalg.norm(a - background(image)[1], axis=-1) > threshold)
    seen, found = np.zeros_like(fg), []
    for y, x in zip(*np.nonzero(fg)):
        if seen[y, x]:
            continue
        region, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < fg.shape[0] and 0 <= nx < fg.shape[1] and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) >= MIN_AREA:
            ys, xs = np.array(region).T
            mask = np.zeros_like(fg)
            mask[ys, xs] = True
            found.append(Blob(mask, len(region), (xs.mean() + 0.5, ys.mean() + 0.5),
                              (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)))
    return sorted(found, key=lambda b: -b.area)


def _shift_or(m):
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def _close(m):
    """Morphological closing (3x3 cross): a one-pixel seam where two colours of a pattern blend towards
    the background's colour does not split an object in two."""
    return ~_shift_or(~_shift_or(m))


def _canonical(blob, side=CANON):
    """The blob's mask, cropped to its bounding box, as a side x side array in [0, 1]."""
    x0, y0, x1, y1 = blob.bbox
    crop = Image.fromarray((blob.mask[y0:y1, x0:x1] * 255).astype(np.uint8))
    return np.asarray(crop.resize((side, side), Image.BILINEAR), np.float32) / 255


def _shape_templates():
    out = {}
    for shape in SHAPES:
        scene = Scene(Thing(shape, "white"), "big", "centre", "black")
        out[shape] = _canonical(blobs(render(scene))[0])
    return out


_TEMPLATES = None


def shape_of(blob):
    """The shape category whose normalised mask overlaps the blob's most (IoU)."""
    global _TEMPLATES
    _TEMPLATES = _TEMPLATES or _shape_templates()
    m = _canonical(blob)
    iou = {s: np.minimum(m, t).sum() / max(np.maximum(m, t).sum(), 1e-6) for s, t in _TEMPLATES.items()}
    return max(iou, key=iou.get)


def _two_means(pixels, rounds=8):
    """(labels, centre of cluster 0, centre of cluster 1) of a 2-means split of (N, 3) colours (medians as
    centres): of the splits started from the pixels at three pairs of quantiles along the colours' main
    direction, the one with the least squared error (a start at the extremes alone may pick a few pixels
    blended with the background as a cluster; a start at fifths may miss a small dot). Deterministic."""
    centred = pixels - pixels.mean(axis=0)
    proj = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
    best = None
    for q in (0.0, 0.05, 0.2):
        lo, hi = np.quantile(proj, [q, 1 - q])
        c = np.stack([np.median(pixels[proj <= lo], axis=0), np.median(pixels[proj >= hi], axis=0)])
        for _ in range(rounds):
            labels = ((pixels[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            c = np.stack([np.median(pixels[labels == k], axis=0) if (labels == k).any() else c[k] for k in (0, 1)])
        cost = ((pixels - c[labels]) ** 2).sum()
        if best is None or cost < best[0]:
            best = (cost, labels, c[0], c[1])
    return best[1:]


SHIFTS = (-0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75)  # sub-pixel offsets of the fitted centre tried for a pattern
MIN_CONTRAST, MIN_SHARE, MIN_INTERIOR = 50.0, 0.05, 8  # a pattern's colours differ by more (RGB), each covers more of the inside


def fill_of(image, blob, shape):
    """("plain", colour) or (pattern, (colour, colour2)) of the blob: its eroded interior's colours split in
    two; if they differ and each covers enough of it, the pattern whose mask (the renderer's own, at the
    object's fitted centre and radius, refined over sub-pixel shifts) agrees best with the split, and the
    two colours in the pattern's order (the part outside its mask first)."""
    a = np.asarray(image.convert("RGB"), np.float32)
    inner = _erode(blob.mask)
    if inner.sum() < MIN_INTERIOR:  # too small to erode
        inner = blob.mask
    pixels = a[inner]
    labels, c0, c1 = _two_means(pixels)
    share = labels.mean()
    names = nearest(c0, OBJECT_COLOURS), nearest(c1, OBJECT_COLOURS)
    if np.linalg.norm(c0 - c1) < MIN_CONTRAST or min(share, 1 - share) < MIN_SHARE or names[0] == names[1]:
        return "plain", nearest(np.median(pixels, axis=0), OBJECT_COLOURS)
    pattern, sign = best_pattern(blob, shape, inner, labels, PATTERNS, pattern_mask)
    return pattern, names if sign > 0 else names[::-1]  # label 1 on the mask: cluster 1 is the second colour


def best_pattern(blob, shape, inner, labels, patterns, mask_of):
    """(pattern, sign): of `patterns` (masks from `mask_of(pattern, u, v)`), the one whose mask at the object's
    fitted centre and radius, refined over sub-pixel shifts, correlates best with the interior's two-colour
    split (`labels` over the pixels of `inner`); sign > 0 when label 1 falls on the mask."""
    (cx, cy), r = _fit_circle(blob, shape)
    ys, xs = np.nonzero(inner)
    split = labels.astype(np.float64) - labels.mean()
    best = (-1.0, None, 1.0)
    for ox in SHIFTS:
        for oy in SHIFTS:
            u, v = (xs + 0.5 - cx - ox) / r, (ys + 0.5 - cy - oy) / r
            for pattern in patterns:
                m = mask_of(pattern, u, v).astype(np.float64)
                m -= m.mean()
                denom = np.sqrt((m ** 2).sum() * (split ** 2).sum())
                corr = float((m * split).sum() / denom) if denom > 0 else 0.0
                best = max(best, (abs(corr), pattern, np.sign(corr)), key=lambda t: t[0])
    return best[1], best[2]


def _fit_circle(blob, shape):
    """(centre, radius) of a render of `shape` whose mask would be the blob's: from its bounding box and
    centroid, through the shape's geometry at unit radius."""
    dx, dy, w, h = _unit_geometry(shape)
    x0, y0, x1, y1 = blob.bbox
    radius = ((x1 - x0) / w + (y1 - y0) / h) / 2
    return (blob.centroid[0] - dx * radius, blob.centroid[1] - dy * radius), radius


def colours_match(seen_pattern, seen, want_pattern, want):
    """Whether read colours meet a caption's: one name, or a pair (as a set for SYMMETRIC patterns)."""
    if isinstance(want, str):
        return seen_pattern == "plain" and seen == want
    if seen_pattern == "plain" or want is None:
        return False
    return set(seen) == set(want) if isinstance(want, frozenset) else tuple(seen) == tuple(want)


def size_of(blob):
    """small or big, by the longer side of the bounding box: 1.6 to 2 radii for every shape, so under
    2 * 7 + 1 px for a small object and over 1.6 * 12 px for a big one."""
    x0, y0, x1, y1 = blob.bbox
    return "big" if max(x1 - x0, y1 - y0) > (2 * RADII["small"] + 1.6 * RADII["big"]) / 2 + 0.5 else "small"


def position_of(blob):
    anchors = dict(POSITIONS, corner=CORNER)
    x, y = blob.centroid
    return min(anchors, key=lambda k: (anchors[k][0] - x) ** 2 + (anchors[k][1] - y) ** 2)


def describe(image):
    """Everything the metrics read from an image: background and, per object (largest first), its
    shape, colour, size and position."""
    bg, _ = background(image)
    objects = []
    for b in blobs(image):
        shape = shape_of(b)
        pattern, colours = fill_of(image, b, shape)
        objects.append(dict(shape=shape, colour=colours, pattern=pattern, size=size_of(b), position=position_of(b),
                            blob=b))
    return dict(background=bg, objects=objects)


def _erode(m):
    return ~_shift_or(~m)


_GEOMETRY = {}


def _unit_geometry(shape):
    """(centroid offset x, y, bounding box width, height) of `shape`'s render, in radii."""
    if shape not in _GEOMETRY:
        r, (cx, cy) = RADII["big"], POSITIONS["centre"]
        b = blobs(draw_thing(Thing(shape, "white"), (cx, cy), r))[0]  # exactly centred: render() jitters
        x0, y0, x1, y1 = b.bbox
        _GEOMETRY[shape] = ((b.centroid[0] - cx) / r, (b.centroid[1] - cy) / r, (x1 - x0) / r, (y1 - y0) / r)
    return _GEOMETRY[shape]


def _explained(seen, reference):
    """1 - SSE / SST: how much of the reference's colour variation the seen pixels reproduce, colours and
    all (R^2 of the reference as a prediction of what is seen). A correlation would forgive the colours
    (a blue-orange checkerboard correlates 0.91 with the orange-teal one); 0 for a plain patch in the
    reference's mean colour, below 0 for anything farther."""
    sst = ((reference - reference.mean(axis=0)) ** 2).sum()
    return float(1 - ((seen - reference) ** 2).sum() / sst) if sst > 0 else 0.0


def identity(image, concept, blob=None):
    """How much the object (`blob`, or the largest) looks like `concept`, in [0, 1]: the concept is rendered
    where the object is and at its size (centre and radius first fitted from the object's mask, then refined
    by a small search, since a pattern's phase moves with a fraction of a pixel), and the score is the best
    share of the render's colour variation over the object's interior that the image reproduces (R^2,
    clipped at 0). A plain-coloured instance scores 0, the right pattern in other colours little; the
    concept itself at any size, position and background near 1."""
    found = blobs(image) if blob is None else [blob]
    if not found:
        return 0.0
    return fitted_r2(image, found[0], Thing(CONCEPTS[concept][0], None, concept), draw_thing)


def fitted_r2(image, blob, thing, draw):
    """The best R^2 (clipped at 0) over the blob's eroded interior of `thing` drawn by `draw(thing, centre,
    radius)` where the blob is: centre and radius fitted from its mask, then refined coarse to fine."""
    inner = _erode(blob.mask)
    if inner.sum() < 4:
        return 0.0
    seen = np.asarray(image.convert("RGB"), np.float32)[inner]
    centre, radius = _fit_circle(blob, thing.shape)

    def score(c, r):
        return _explained(seen, np.asarray(draw(thing, c, r), np.float32)[inner])

    best = (score(centre, radius), centre, radius)
    for step in (0.6, 0.3, 0.15):  # coarse to fine, around the best so far
        _, (cx, cy), r = best
        for ox in (-step, 0, step):
            for oy in (-step, 0, step):
                for dr in ((-step, 0, step) if step > 0.2 else (0,)):
                    candidate = ((cx + ox, cy + oy), r + dr)
                    best = max(best, (score(*candidate), *candidate), key=lambda t: t[0])
    return max(best[0], 0.0)


def match_objects(seen, want):
    """(main, second) of the objects read from an image (`describe`), matched to a caption's attributes
    (`Scene.attributes`): the main object agrees best on shape, pattern and position; the second is the
    other object with the second's shape and colour, else the largest other one (None if there is none)."""
    objects = seen["objects"]
    ranked = sorted(objects, key=lambda o: -((o["shape"] == want["shape"]) * 2 + (o["pattern"] == want.get("pattern"))
                                              + (o["position"] == want.get("position"))))
    main = ranked[0] if ranked else None
    others = [o for o in objects if o is not main]
    named = [o for o in others if want["second"] and (o["shape"], o["colour"]) == want["second"]
             and o["pattern"] == "plain"]
    return main, (named or others or [None])[0]


def alignment(image, scene, seen=None):
    """The fraction of the caption's attributes (the concept's identity excepted) the image satisfies:
    the main object's shape, colour(s) and pattern (unless a concept), size and position, the background,
    and the second object (present with its shape and colour, or absent when the caption names none); an
    attribute the caption leaves out is not counted. `seen`: the image's `describe`, if already read."""
    seen = seen or describe(image)
    want = scene.attributes()
    main, second = match_objects(seen, want)
    checks = {}
    if "background" in want:
        checks["background"] = seen["background"] == want["background"]
    for key in ("shape", "colour", "pattern", "size", "position"):
        if key == "colour" and key in want:
            checks[key] = main is not None and colours_match(main["pattern"], main["colour"], want.get("pattern"),
                                                             want["colour"])
        elif key in want:
            checks[key] = main is not None and main[key] == want[key]
    if want["second"] is None:
        checks["second"] = second is None
    else:
        checks["second"] = second is not None and (second["shape"], second["colour"]) == want["second"] \
            and second["pattern"] == "plain"
    return sum(checks.values()) / len(checks), checks
