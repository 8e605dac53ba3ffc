"""Random patterned scenes for the VAE alone. A frozen VAE must encode a concept's pattern that it never
saw (a VAE trained on flat scenes blurs a checkerboard away), as SD's VAE encodes any texture because it
saw all kinds. So the VAE also sees objects filled with generic patterns (checkerboards, stripes, splits,
dots, borders) at random scales, angles and colours; never a concept's own shape, pattern and colours
together, and never with a caption: the U-Net and text encoder see only the grammar's flat scenes."""
import math
import random

import numpy as np

from worlds.shapes.scene import SHAPES, SIZE, SUPER, _draw


def _colour(rng):
    return np.array([rng.randrange(256) for _ in range(3)], np.float32)


def random_pattern(rng):
    """A fill over unit coordinates (u, v) -> (..., 3) colours: one of five generic families."""
    a, b = _colour(rng), _colour(rng)
    kind, scale = rng.randrange(6), rng.uniform(1.5, 4.0)
    angle = rng.uniform(0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    if kind == 0:
        return None  # flat
    if kind == 1:  # checkerboard
        return lambda u, v: np.where(((np.floor((c * u + s * v) * scale) + np.floor((c * v - s * u) * scale)) % 2
                                      == 1)[..., None], a, b)
    if kind == 2:  # stripes
        return lambda u, v: np.where((np.floor((c * u + s * v) * scale) % 2 == 0)[..., None], a, b)
    if kind == 3:  # two halves
        return lambda u, v: np.where((c * u + s * v < 0)[..., None], a, b)
    if kind == 4:  # a dot
        r, x, y = rng.uniform(0.2, 0.45), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)
        return lambda u, v: np.where(((u - x) ** 2 + (v - y) ** 2 < r * r)[..., None], a, b)
    edge, inner = rng.uniform(0.4, 0.7), _colour(rng)  # a striped border
    return lambda u, v: np.where((np.maximum(abs(u), abs(v)) > edge)[..., None],
                                 np.where((np.floor((u + v) * scale) % 2 == 0)[..., None], a, b), inner)


def random_textured_image(rng: random.Random):
    """(64, 64, 3) uint8: a random background with one to three objects, flat or patterned."""
    canvas = np.empty((SIZE * SUPER, SIZE * SUPER, 3), np.float32)
    canvas[:] = _colour(rng)
    for _ in range(rng.randint(1, 3)):
        fill = random_pattern(rng) or _colour(rng)
        _draw(canvas, rng.choice(SHAPES), fill, (rng.uniform(4, 60), rng.uniform(4, 60)), rng.uniform(5, 15))
    return canvas.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3)).round().clip(0, 255).astype(np.uint8)
