"""Sampling shared by infer.py and validation during training."""
import math

import torch
from PIL import Image

from attndreambooth.inference.attention_maps import AttentionMapAverager
from attndreambooth.inference.schedulers import SCHEDULERS


def set_scheduler(pipe, name=None):
    """Swap the pipeline's sampler, keeping the model's noise schedule (None: the model family's default)."""
    import diffusers

    from attndreambooth.families import of_pipeline
    family = of_pipeline(pipe)
    name = name or family.samplers[0]
    check_sampler(family, name)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    return pipe


def check_sampler(family, name):
    """ValueError, naming the samplers that fit, when `name` is not one of the model family's."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not one of {sorted(SCHEDULERS)}")
    if name not in family.samplers:
        raise ValueError(f"--scheduler {name} is not a sampler of this model (family {family.name}); use one of "
                         f"{', '.join(family.samplers)}")


def image_grid(images, cols=None):
    """Paste images into one grid, row-major."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def sample(pipe, prompt, num_images=4, seed=0, batch_size=4, **settings):
    """Images for one prompt; image i always comes from seed + i (whatever the batch size).
    With `attention_maps`, also the (num_images, text tokens, h, w) per-token maps at latent size (attention_maps.py)."""
    ((_, images, maps),) = sample_prompts(pipe, [prompt], num_images, seed, batch_size, **settings)
    return images, maps


@torch.no_grad()
def sample_prompts(pipe, prompts, num_images=4, seed=0, batch_size=4, steps=50, guidance_scale=7.5,
                   negative_prompt=None, height=None, width=None, attention_maps=False, expected_layers=None,
                   seeds=None):
    """`num_images` per prompt, `batch_size` images per denoiser call whichever prompts they belong to (a small
    model on a CPU runs a batch of 16 1.3x faster per image than one of 4); image i of every prompt comes from
    seed + i (or from seeds[i]). Yields (prompt's index, its images, its maps or None) as each prompt's last
    image is done."""
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(num_images)]
    from attndreambooth.families import of_pipeline
    family = of_pipeline(pipe)
    height, width = height or family.default_side(pipe), width or family.default_side(pipe)
    jobs = [(p, i) for p in range(len(prompts)) for i in range(num_images)]  # prompt-major: prompts end in order
    done, images, maps = 0, [], []  # the images (and their maps) of prompts not yet yielded
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        kwargs = dict(prompt=[prompts[p] for p, _ in batch], num_images_per_prompt=1, num_inference_steps=steps,
                      generator=[torch.Generator("cpu").manual_seed(seeds[i]) for _, i in batch],
                      guidance_scale=guidance_scale, height=height, width=width,
                      negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch))
        if attention_maps:
            grid = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            averager = AttentionMapAverager(family.token_maps(family.denoiser(pipe), expected_layers), len(batch), grid)
            with averager.capture:
                images += pipe(**kwargs, callback_on_step_end=averager).images
            maps += list(averager.average())
        else:
            images += pipe(**kwargs).images
        while len(images) >= num_images:  # every prompt whose images are all done, in order
            yield done, images[:num_images], torch.stack(maps[:num_images]) if attention_maps else None
            images, maps, done = images[num_images:], maps[num_images:], done + 1


def validation_grid(family, components, concept, vcfg, device, autocast, side=None):
    """A grid (one row per prompt) from the models being trained, `side` px square (default: the pipeline's);
    leaves the training's RNG untouched."""
    unet = components[family.denoiser_name]
    pipe = family.pipeline(components)
    set_scheduler(pipe)  # the family's default sampler
    pipe.set_progress_bar_config(disable=True)
    kept_off = [m for name, m in components.items() if name == "vae" or name in family.text_encoder_names]
    devices, unet_mode = [m.device for m in kept_off], unet.training
    for m in kept_off:  # the VAE, and the text encoders once the training keeps only their output
        m.to(device)
    unet.eval()
    rows, scale = [], family.guidance_scale if vcfg.guidance_scale is None else vcfg.guidance_scale
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []), autocast:
        for template in vcfg.prompts:
            images, _ = sample(pipe, template.replace("{}", concept), vcfg.num_images, vcfg.seed,
                               batch_size=vcfg.num_images, steps=vcfg.steps, guidance_scale=scale,
                               height=side, width=side)
            rows += images
    for m, d in zip(kept_off, devices):
        m.to(d)
    unet.train(unet_mode)
    return image_grid(rows, cols=vcfg.num_images)
