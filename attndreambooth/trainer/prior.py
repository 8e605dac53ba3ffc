"""DreamBooth's prior preservation (`prior` in the config): class images made by the base model before it
trains, encoded once, and a second batch of them in every step of the stages that train U-Net weights,
denoised with the class prompt; their MSE, times `prior.weight`, joins the loss (Ruiz et al. 2023)."""
import dataclasses
import logging
import os
import re
from pathlib import Path

import torch

from attndreambooth.config.plan import UNET_PARTS

log = logging.getLogger(__name__)
CHUNK = 8  # class images per denoiser call, and written together


def class_prompt(cfg):
    """The class prompt: `prior.class_prompt` ({category} filled in), else the training prompt without [V]."""
    text = cfg.prior.class_prompt or cfg.data.prompt_template.replace("{placeholder}", "")
    return re.sub(r"\s+", " ", text.replace("{category}", cfg.data.category)).strip()


def class_dir(cfg):
    return Path(os.path.expanduser(cfg.prior.class_dir or Path(cfg.output_dir) / "class_images"))


def uses_prior(cfg, stage):
    """Whether a stage gets the prior's batch: the run asks for it and the stage trains U-Net weights."""
    return cfg.prior.enabled and bool(set(stage.train) & UNET_PARTS)


def class_images(cfg, pipe, family, accelerator):
    """The class images' paths: those in the class folder, first completed to `num_class_images` with the base
    model (the main process; image i from seed i, each written whole under its final name, so two runs that
    share a folder write the same files and never a partial one)."""
    from attndreambooth.trainer.data import list_images
    folder, want = class_dir(cfg), cfg.prior.num_class_images
    # the base model's own images are its size: only what training reads (data.resolution) is asked of them
    data_cfg = dataclasses.replace(cfg.data, instance_dir=str(folder),
                                   min_image_size=min(cfg.data.min_image_size, cfg.data.resolution))
    have = list_images(data_cfg, key="prior.class_dir") if folder.is_dir() and any(folder.iterdir()) else []
    if len(have) < want:
        if accelerator.is_main_process:
            missing = [i for i in range(want) if not (folder / f"class_{i:05d}.png").exists()][:want - len(have)]
            with accelerator.autocast():
                generate(cfg, pipe, family, folder, missing)
        accelerator.wait_for_everyone()
        have = list_images(data_cfg, key="prior.class_dir")  # read again only when images were added
    return have[:want]


@torch.no_grad()
def generate(cfg, pipe, family, folder, indices):
    from attndreambooth.inference.sampling import sample_prompts, set_scheduler
    prompt = class_prompt(cfg)
    log.info("prior preservation: generating %d class images of %r in %s (%d sampler steps)", len(indices), prompt,
             folder, cfg.prior.steps)
    folder.mkdir(parents=True, exist_ok=True)
    sampler = set_scheduler(family.pipeline(family.components(pipe)), "dpm++")  # the training keeps its scheduler
    sampler.set_progress_bar_config(disable=True)
    for start in range(0, len(indices), CHUNK):  # image i from seed i: the same files whichever runs made them
        chunk = indices[start:start + CHUNK]
        ((_, images, _),) = sample_prompts(sampler, [prompt], len(chunk), seeds=chunk, batch_size=CHUNK,
                                           steps=cfg.prior.steps)
        for index, image in zip(chunk, images):
            part = folder / f".class_{index:05d}.{os.getpid()}.png"
            image.save(part)
            os.replace(part, folder / f"class_{index:05d}.png")


@torch.no_grad()
def attach_prior(cfg, pipe, family, text_encoders, tokenizers, sampler, accelerator):
    """Give the instance sampler its class sampler (`sampler.prior`, drawing with the same generators, so the
    checkpoint needs only its image order); returns the class prompt's conditioning, computed once (it holds
    no [V], so nothing a stage trains changes it). The U-Net and text encoders are on the device already."""
    from attndreambooth.trainer.data import LatentSampler, encode_view_pool
    vae, device = pipe.vae, accelerator.device
    vae.to(device)
    paths = class_images(cfg, pipe, family, accelerator)
    one_view = dataclasses.replace(cfg.data, views_per_image=1)
    mean, std, geometry = encode_view_pool(vae, paths, one_view, cfg.runtime.seed + 1, device)
    vae.to("cpu")
    sampler.prior = LatentSampler(mean, std, len(paths), vae.config.scaling_factor, sampler.gen, geometry,
                                  sampler.device_gen)
    ids = [tok(class_prompt(cfg), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device) for tok in tokenizers]
    with accelerator.autocast():
        cond = family.encode(text_encoders, ids).float()
    log.info("prior preservation: %d class images of %r, weight %g, in the stages that train U-Net weights",
             len(paths), class_prompt(cfg), cfg.prior.weight)
    return cond
