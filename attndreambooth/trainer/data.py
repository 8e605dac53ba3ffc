"""Instance images, the released code's augmentation, and a pool of VAE-encoded views.

Images and the prompt are fixed, so each augmented view is encoded once (posterior mean
and std kept) and every step samples fresh latents from the pool: the VAE does not run
in the training loop.
"""
import hashlib
import io
import itertools
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def fingerprint(paths):
    """{file name: [size in bytes, sha256]} of the instance images: what a resumed run must find again."""
    return {Path(p).name: [Path(p).stat().st_size, hashlib.sha256(Path(p).read_bytes()).hexdigest()] for p in paths}


def fingerprint_changes(old, new):
    """What changed between two fingerprints, in words ("" when nothing did); a file under a new name with the
    same bytes is a rename (it still moves the photos' order, which the run's data stream follows)."""
    added, removed = new.keys() - old.keys(), old.keys() - new.keys()
    renamed = {}
    for name in sorted(removed):
        twin = next((n for n in sorted(added) if new[n] == old[name] and n not in renamed.values()), None)
        if twin is not None:
            renamed[name] = twin
    parts = [(what, sorted(names)) for what, names in (
        ("renamed", {f"{a} -> {b}" for a, b in renamed.items()}), ("added", added - set(renamed.values())),
        ("removed", removed - renamed.keys()),
        ("changed", {n for n in old.keys() & new.keys() if old[n] != new[n]})) if names]
    return "; ".join(f"{what} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" for what, names in parts)


def list_images(data_cfg, report=None, key="data.instance_dir"):
    """The instance images, each fully decoded once to check it. Non-image files, unreadable,
    truncated or tiny images fail with the file named (or are skipped if the config says so);
    conversions, small and duplicate images are reported through `report` (default: the log)."""
    report = report or log.warning
    folder = Path(data_cfg.instance_dir)
    images, seen, unusable = [], {}, []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # .DS_Store, editor swap files
            continue
        problem = image_problem(path) or _check_size(path, data_cfg, report)
        if problem is None:
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            if digest in seen:
                report(f"{path} is a duplicate of {seen[digest]}: it will weigh twice in training")
            seen.setdefault(digest, path)
            images.append(path)
        elif data_cfg.skip_invalid_files:
            report(f"skipping {path}: it {problem}")
        else:
            unusable.append(f"  {path} {problem}")
    if unusable:
        skip = ", or set data.skip_invalid_files=true to skip such files" if key == "data.instance_dir" else ""
        raise ValueError(f"{key}: {len(unusable)} file(s) cannot be used:\n" + "\n".join(unusable)
                         + f"\nremove them{skip}")
    if not images:
        raise ValueError(f"{key}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def image_problem(path):
    """None if `path` is an image file that decodes whole, else what is wrong with it, in words: the one check
    every command that reads images applies (the trainer's photos and class images, evaluate's folders). A
    special file (a named pipe, socket or device) is refused before anything opens it: reading one blocks."""
    if path.is_dir():
        return "is a folder"
    if not path.is_file():
        return "is not a regular file (a named pipe, socket or device)"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"is not an image ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}); HEIC/TIFF photos: convert to JPEG"
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: truncated files fail here, not in the middle of a run
    except Image.DecompressionBombError as e:
        return f"is too large to decode safely ({e}); downscale it (a few megapixels are plenty)"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"cannot be read as an image ({e})"
    return None


def _check_size(path, data_cfg, report):
    """For training: None if a decodable image is large enough (reporting what will be converted), else why not."""
    with Image.open(path) as im:  # the header only: image_problem has decoded it
        mode, size = im.mode, im.size
    if min(size) < data_cfg.min_image_size:
        return (f"is {size[0]}x{size[1]} px, under data.min_image_size={data_cfg.min_image_size}; "
                "use a larger photo")
    if min(size) < data_cfg.resolution:
        report(f"{path} is {size[0]}x{size[1]} px, smaller than data.resolution={data_cfg.resolution}: "
               "it will be upscaled (blurry training images)")
    if mode not in ("RGB",):
        how = "alpha composited on " + data_cfg.alpha_background if mode in ("RGBA", "LA", "PA", "P") else "converted"
        report(f"{path} is in mode {mode}: {how} to RGB")
    return None


def load_rgb(path, background="white", max_side=None):
    """Open an image with its EXIF orientation applied, as 8-bit RGB: grayscale, CMYK, palette and
    16-bit images converted, transparency composited on `background`; large JPEGs decoded at
    reduced size when `max_side` allows."""
    with Image.open(path) as im:
        if max_side:
            im.draft("RGB", (max_side, max_side))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
        im = to_srgb(ImageOps.exif_transpose(im))
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale by the 16-bit range, don't clip at 255
            a = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((a.clip(0, 65535) / 65535 * 255).round().astype(np.uint8), "L")
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            flat = Image.new("RGB", im.size, background)
            flat.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
            return flat
        return im.convert("RGB")


def original_size(path):
    """(height, width) of a photo as displayed (EXIF orientation applied), read from its header."""
    with Image.open(path) as im:
        w, h = im.size
        return (w, h) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)  # 5-8: rotated by 90 degrees


def to_srgb(im):
    """An image with an embedded ICC colour profile (Display P3, Adobe RGB, CMYK press profiles...)
    converted to sRGB, the colours the model was trained on; others unchanged."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return im
    from PIL import ImageCms
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if im.mode in ("RGBA", "LA") else "RGB"
        return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        log.warning("%s: its colour profile cannot be read (%s); colours are taken as sRGB", im.filename or "image", e)
        return im


def augmented_view(image, resolution, aug, rng: random.Random):
    """The released code's augmentation (rotation with expansion, flip, shorter side resize, square crop):
    (the view, the crop's top-left corner (top, left) in the resized image: SDXL's crop conditioning)."""
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
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def to_tensor(image):
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def encode_view_pool(vae, paths, data_cfg, seed, device):
    """Encode `views_per_image` augmented views of every image once.

    Returns (mean, std, geometry): mean and std (images * views, channels, h, w), ordered image-major (view v
    of image i sits at i * views + v), and each view's geometry (images * views, 6): the photo's original
    (height, width), the crop's (top, left), the (height, width) trained at (SDXL's size and crop
    conditioning, its `time_ids`)."""
    rng = random.Random(seed)
    res = data_cfg.resolution
    images = [load_rgb(p, data_cfg.alpha_background, 2 * res) for p in paths]
    originals = [original_size(p) for p in paths]  # before load_rgb's cap on large photos
    micro = []

    def views():
        for image, original in zip(images, originals):
            for _ in range(data_cfg.views_per_image):
                view, corner = augmented_view(image, res, data_cfg.augment, rng)
                micro.append(torch.tensor([*original, *corner, res, res], dtype=torch.float32))
                yield to_tensor(view)

    mean, std = encode_pixels(vae, views(), device)
    return mean, std, torch.stack(micro)


@torch.no_grad()
def encode_pixels(vae, pixels, device, chunk=8):
    """VAE posterior (mean, std) of an iterable of (3, H, W) images in [-1, 1], `chunk` at a time."""
    means, stds, views = [], [], iter(pixels)
    while batch := list(itertools.islice(views, chunk)):
        dist = vae.encode(torch.stack(batch).to(device=device, dtype=vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


class LatentBatches:
    """Batches of latents: images in shuffled epochs (as a shuffled repeated data set), a random
    pre-encoded view of each, a fresh posterior sample, less the VAE's shift, times its scaling factor. The image order is
    drawn on the host (`generator`); the view, the posterior sample, and the step's noise and timesteps
    (`draw`) on the device the pool lives on (`device_generator`, the same generator on a CPU), so a step
    reads nothing back from the device."""

    def __init__(self, mean, std, num_images, scaling_factor, generator: torch.Generator, geometry=None,
                 device_generator=None, shift=0.0):
        self.mean, self.std, self.scale, self.gen = mean, std, scaling_factor, generator
        self.shift = shift  # subtracted before scaling (FLUX.1's and SD3's VAEs)
        self.device_gen = device_generator or generator
        self.geometry = None if geometry is None else geometry.to(mean.device)  # moved once, not per step
        self.num_images, self.views = num_images, mean.shape[0] // num_images
        self.order, self.queued = [], None
        self.prior = None  # prior preservation's class-image batches (trainer/prior.py), drawing with these generators

    def state_dict(self):
        state = {"generator": self.gen.get_state(), "order": list(self.order)}
        if self.prior is not None:
            state["prior_order"] = list(self.prior.order)
        if self.device_gen is not self.gen:
            state["device_generator"] = self.device_gen.get_state()
        return state

    def load_state_dict(self, state):
        self.gen.set_state(state["generator"])
        if self.device_gen is not self.gen and "device_generator" in state:  # else RunState seeded it
            self.device_gen.set_state(state["device_generator"])
        self.order = list(state["order"])
        if self.prior is not None:
            self.prior.order = list(state.get("prior_order") or [])

    def _next_image(self):
        if not self.order:
            self.order = torch.randperm(self.num_images, generator=self.gen).tolist()
        return self.order.pop()

    def queue(self, batch_size):
        """The host's part of a batch: its images, into a fixed (pinned, on a GPU) buffer that `sample` copies
        from, so a CUDA graph's replay reads each step's own images."""
        if self.queued is None or len(self.queued) != batch_size:
            self.queued = torch.empty(batch_size, dtype=torch.int64)
            self.queued = self.queued.pin_memory() if self.mean.device.type == "cuda" else self.queued
        self.queued.copy_(torch.tensor([self._next_image() for _ in range(batch_size)]))

    def sample(self, batch_size, with_geometry=False, queued=False):
        """Latents (batch, channels, h, w); with `with_geometry`, also the sampled views' geometry. `queued`:
        the images `queue` put in the buffer (else they are drawn now)."""
        if not queued:
            self.queue(batch_size)
        images = self.queued.to(self.mean.device, non_blocking=True)  # asynchronous: the host does not wait
        gen = self.device_gen
        index = images.to(gen.device) * self.views + torch.randint(self.views, (batch_size,), generator=gen,
                                                                    device=gen.device)
        index = index.to(self.mean.device)
        mean, std = self.mean[index], self.std[index]
        eps = torch.randn(mean.shape, generator=gen, device=gen.device).to(mean.device)
        latents = (mean + std * eps - self.shift) * self.scale if self.shift else (mean + std * eps) * self.scale
        return (latents, self.geometry[index]) if with_geometry else latents


def draw_noise(batches, latents, family, noise_scheduler):
    """A step's noise and timesteps (as the family draws them), on the data stream's device generator when it
    has one (else its generator)."""
    gen = getattr(batches, "device_gen", batches.gen)
    noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(latents.device)
    timesteps = family.timesteps(noise_scheduler, latents.shape[0], gen)
    return noise, timesteps.to(latents.device)
