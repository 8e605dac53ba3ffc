"""Instance images, the released code's augmentation, and a pool of VAE-encoded views.

Images and the prompt are fixed, so each augmented view is encoded once (posterior mean
and std kept) and every step samples fresh latents from the pool: the VAE does not run
in the training loop.
"""
import itertools
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(data_cfg):
    """The instance images, checked to open; non-image files fail (or are skipped if the config says so)."""
    folder = Path(data_cfg.instance_dir)
    images = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # .DS_Store, editor swap files
            continue
        problem = None
        if path.is_dir():
            problem = "is a folder"
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            problem = f"is not an image ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})"
        else:
            try:
                with Image.open(path) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                problem = f"cannot be read as an image ({e})"
        if problem is None:
            images.append(path)
        elif data_cfg.skip_invalid_files:
            log.warning("skipping %s: it %s", path, problem)
        else:
            raise ValueError(f"data.instance_dir: {path} {problem}; remove it, or set "
                             "data.skip_invalid_files=true to skip such files")
    if not images:
        raise ValueError(f"data.instance_dir: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def load_rgb(path):
    """Open an image with its EXIF orientation applied, as RGB."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def augment(image, resolution, aug, rng: random.Random):
    """Released code's augmentation: rotation with expansion, flip, shorter side resize, square crop."""
    if rng.random() < aug.rotate_prob:
        angle = rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg)
        image = image.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=(0, 0, 0))
    if rng.random() < aug.flip_prob:
        image = ImageOps.mirror(image)
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    if aug.random_crop:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image):
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def encode_view_pool(vae, paths, data_cfg, seed, device):
    """Encode `views_per_image` augmented views of every image once.

    Returns (mean, std), each (images * views, 4, h, w), ordered image-major: view v of
    image i sits at i * views + v."""
    rng = random.Random(seed)
    images = [load_rgb(p) for p in paths]
    views = (to_tensor(augment(image, data_cfg.resolution, data_cfg.augment, rng))
             for image in images for _ in range(data_cfg.views_per_image))
    return encode_pixels(vae, views, device)


@torch.no_grad()
def encode_pixels(vae, pixels, device, chunk=8):
    """VAE posterior (mean, std) of an iterable of (3, H, W) images in [-1, 1], `chunk` at a time."""
    means, stds, views = [], [], iter(pixels)
    while batch := list(itertools.islice(views, chunk)):
        dist = vae.encode(torch.stack(batch).to(device=device, dtype=vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


class LatentSampler:
    """Batches of latents: images in shuffled epochs (as a shuffled repeated data set), a random
    pre-encoded view of each, a fresh posterior sample, times the VAE scaling factor."""

    def __init__(self, mean, std, num_images, scaling_factor, generator: torch.Generator):
        self.mean, self.std, self.scale, self.gen = mean, std, scaling_factor, generator
        self.num_images, self.views = num_images, mean.shape[0] // num_images
        self.order = []

    def _next_image(self):
        if not self.order:
            self.order = torch.randperm(self.num_images, generator=self.gen).tolist()
        return self.order.pop()

    def sample(self, batch_size):
        images = torch.tensor([self._next_image() for _ in range(batch_size)])
        index = images * self.views + torch.randint(self.views, (batch_size,), generator=self.gen)
        index = index.to(self.mean.device)
        mean, std = self.mean[index], self.std[index]
        eps = torch.randn(mean.shape, generator=self.gen).to(mean.device)
        return (mean + std * eps) * self.scale
