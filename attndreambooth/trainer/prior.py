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


def class_image_estimate(cfg):
    """One line for --dry_run and the log before generating: how many class images there are, how many the base
    model will make, its denoiser calls and (estimated) disk. Lists the folder once; reads no image."""
    folder, want = class_dir(cfg), cfg.prior.num_class_images
    have = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else 0
    make = max(0, want - have)
    megabytes = make * cfg.data.resolution ** 2 * 3 * 0.5 / 1e6  # PNG of a photo: about half its raw size
    work = (f"{make:,} to generate with the base model ({make * cfg.prior.steps:,} denoiser steps with guidance, "
            f"~{megabytes:,.0f} MB of PNG, estimated)") if make else "none to generate"
    return f"prior preservation: {want:,} class images of {class_prompt(cfg)!r} in {folder}: {have:,} there, {work}"


def class_data_config(cfg):
    """The class folder read as a data folder: the base model's own images are its size, so only what training
    reads (data.resolution) is asked of them."""
    return dataclasses.replace(cfg.data, instance_dir=str(class_dir(cfg)),
                               min_image_size=min(cfg.data.min_image_size, cfg.data.resolution))


def check_class_images(cfg):
    """The class images already in the folder, each checked whole (preflight calls this before any weights
    load, so a damaged one is one line, not a traceback after loading)."""
    from attndreambooth.trainer.data import list_images
    folder = class_dir(cfg)
    if not (folder.is_dir() and any(p for p in folder.iterdir() if not p.name.startswith("."))):
        return []
    return list_images(class_data_config(cfg), key="prior.class_dir")


def class_images(cfg, pipe, family, accelerator):
    """The class images' paths: those in the class folder, first completed to `num_class_images` with the base
    model (the main process; image i from seed i, each written whole under its final name, so two runs that
    share a folder write the same files and never a partial one)."""
    from attndreambooth.trainer.data import list_images
    folder, want = class_dir(cfg), cfg.prior.num_class_images
    have = check_class_images(cfg)
    if len(have) < want:
        if accelerator.is_main_process:
            missing = [i for i in range(want) if not (folder / f"class_{i:05d}.png").exists()][:want - len(have)]
            with accelerator.autocast():
                generate(cfg, pipe, family, folder, missing)
        accelerator.wait_for_everyone()
        have = list_images(class_data_config(cfg), key="prior.class_dir")  # again only when images were added
    return have[:want]


@torch.no_grad()
def generate(cfg, pipe, family, folder, indices):
    from tqdm.auto import tqdm

    from attndreambooth.inference.sampling import sample_prompts, set_scheduler
    prompt = class_prompt(cfg)
    log.info("%s", class_image_estimate(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    sampler = set_scheduler(family.pipeline(family.components(pipe)))  # the training keeps its scheduler
    sampler.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(indices), desc="class images", unit="image")  # with its rate and time left
    for start in range(0, len(indices), CHUNK):  # image i from seed i: the same files whichever runs made them
        chunk = indices[start:start + CHUNK]
        ((_, images, _),) = sample_prompts(sampler, [prompt], len(chunk), seeds=chunk, batch_size=CHUNK,
                                           steps=cfg.prior.steps)
        for index, image in zip(chunk, images):
            part = folder / f".class_{index:05d}.{os.getpid()}.png"
            image.save(part)
            os.replace(part, folder / f"class_{index:05d}.png")
        bar.update(len(chunk))
    bar.close()


@torch.no_grad()
def attach_prior(cfg, pipe, family, text_encoders, tokenizers, batches, accelerator):
    """Give the instance photos' LatentBatches one of the class images (`batches.prior`, drawing with the same
    generators, so the checkpoint needs only its image order); returns the class prompt's conditioning,
    computed once (it holds no [V], so nothing a stage trains changes it). The U-Net and text encoders are on
    the device already."""
    from attndreambooth.trainer.data import LatentBatches, encode_view_pool
    vae, device = pipe.vae, accelerator.device
    vae.to(device)
    paths = class_images(cfg, pipe, family, accelerator)
    one_view = dataclasses.replace(cfg.data, views_per_image=1)
    mean, std, geometry = encode_view_pool(vae, paths, one_view, cfg.runtime.seed + 1, device)
    vae.to("cpu")
    batches.prior = LatentBatches(mean, std, len(paths), vae.config.scaling_factor, batches.gen, geometry,
                                  batches.device_gen)
    ids = [tok(class_prompt(cfg), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device) for tok in tokenizers]
    with accelerator.autocast():
        cond = family.encode(text_encoders, ids).float()
    log.info("prior preservation: %d class images of %r, weight %g, in the stages that train U-Net weights",
             len(paths), class_prompt(cfg), cfg.prior.weight)
    return cond
