"""Reading a shapes-world image exactly, from its pixels: the background colour, the objects
(segmented against the background), each object's shape, colour, size and position, a concept's
identity score, and the text alignment of an image with its scene's caption."""
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from attndreambooth.shapes.scene import (BACKGROUNDS, COLOURS, CONCEPTS, CORNER, OBJECT_COLOURS, POSITIONS, RADII,
                                         SHAPES, Scene, Thing, draw_thing, render)

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


def colour_of(image, blob):
    """The palette name of the blob's median colour (its eroded interior, away from blended edges)."""
    a = np.asarray(image.convert("RGB"), np.float32)
    inner = blob.mask.copy()
    inner[1:-1, 1:-1] &= blob.mask[:-2, 1:-1] & blob.mask[2:, 1:-1] & blob.mask[1:-1, :-2] & blob.mask[1:-1, 2:]
    pixels = a[inner] if inner.sum() >= 4 else a[blob.mask]
    return nearest(np.median(pixels, axis=0), OBJECT_COLOURS)


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
    return dict(background=bg, objects=[dict(shape=shape_of(b), colour=colour_of(image, b), size=size_of(b),
                                             position=position_of(b), blob=b) for b in blobs(image)])


def _erode(m):
    return ~_shift_or(~m)


_GEOMETRY = {}


def _unit_geometry(shape):
    """(centroid offset x, y, bounding box width, height) of `shape`'s render, in radii."""
    if shape not in _GEOMETRY:
        r, (cx, cy) = RADII["big"], POSITIONS["centre"]
        b = blobs(render(Scene(Thing(shape, "white"), "big", "centre", "black")))[0]
        x0, y0, x1, y1 = b.bbox
        _GEOMETRY[shape] = ((b.centroid[0] - cx) / r, (b.centroid[1] - cy) / r, (x1 - x0) / r, (y1 - y0) / r)
    return _GEOMETRY[shape]


def _ncc(a, b):
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    denom = np.sqrt((a ** 2).sum() * (b ** 2).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def identity(image, concept, blob=None):
    """How much the object (`blob`, or the largest) looks like `concept`, in [0, 1]: the concept is rendered
    where the object is and at its size (centre and radius first fitted from the object's mask, then refined
    by a small search, since a pattern's phase moves with a fraction of a pixel), and the score is the best
    normalised cross-correlation of the two images' mean-removed colours over the object's interior,
    clipped at 0. A plain-coloured instance has no structure to correlate (near 0); the concept itself at
    any size, position and background scores near 1."""
    found = blobs(image) if blob is None else [blob]
    if not found:
        return 0.0
    blob, thing = found[0], Thing(CONCEPTS[concept][0], None, concept)
    inner = _erode(blob.mask)
    if inner.sum() < 4:
        return 0.0
    seen = np.asarray(image.convert("RGB"), np.float32)[inner]
    dx, dy, w, h = _unit_geometry(thing.shape)
    x0, y0, x1, y1 = blob.bbox
    radius = ((x1 - x0) / w + (y1 - y0) / h) / 2
    centre = (blob.centroid[0] - dx * radius, blob.centroid[1] - dy * radius)

    def score(c, r):
        return _ncc(seen, np.asarray(draw_thing(thing, c, r), np.float32)[inner])

    best = (score(centre, radius), centre, radius)
    for step in (0.6, 0.3, 0.15):  # coarse to fine, around the best so far
        _, (cx, cy), r = best
        for ox in (-step, 0, step):
            for oy in (-step, 0, step):
                for dr in ((-step, 0, step) if step > 0.2 else (0,)):
                    candidate = ((cx + ox, cy + oy), r + dr)
                    best = max(best, (score(*candidate), *candidate), key=lambda t: t[0])
    return max(best[0], 0.0)


def alignment(image, scene):
    """The fraction of the caption's attributes (the concept's identity excepted) the image satisfies:
    the main object's shape, colour (unless a concept), size and position, the background, and the second
    object (present with its shape and colour, or absent when the caption names none); an attribute the
    caption leaves out is not counted."""
    seen = describe(image)
    want = scene.attributes()
    objects = seen["objects"]
    ranked = sorted(objects, key=lambda o: -((o["shape"] == want["shape"]) * 2 + (o["colour"] == want.get("colour"))
                                              + (o["position"] == want.get("position"))))
    main = ranked[0] if ranked else None
    checks = {}
    if "background" in want:
        checks["background"] = seen["background"] == want["background"]
    for key in ("shape", "colour", "size", "position"):
        if key in want:
            checks[key] = main is not None and main[key] == want[key]
    others = [o for o in objects if o is not main]
    if want["second"] is None:
        checks["second"] = not others
    else:
        checks["second"] = any((o["shape"], o["colour"]) == want["second"] for o in others)
    return sum(checks.values()) / len(checks), checks
