"""A model's shapes without its weights: the model on the meta device, for plans, memory estimates and checks
that must come before any download (its own configs for a folder; for a hub id or single file, the built-in
layout of its family)."""
import re
from pathlib import Path

import torch

from attndreambooth.models import model_source


def meta_models(cfg):
    """(source, unet, [text encoders], vae) of the model on the meta device (shapes only): the model's own
    configs for a folder; for a hub id or single file (no download for a plan) the built-in layout of its
    family (model_family: SDXL-base, SD 1.5 or SD 2.1-base)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from attndreambooth import models as M
    from attndreambooth.sdxl import SDXL_TEXT, SDXL_UNET
    kind, where = model_source(cfg.model)
    with torch.device("meta"):
        if kind == "folder":
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(where, subfolder="unet"))
            texts = [CLIPTextModel(CLIPTextConfig.from_pretrained(where, subfolder=sub))
                     for sub in ("text_encoder", "text_encoder_2") if (Path(where) / sub).is_dir()]
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(where, subfolder="vae"))
            return where, unet, texts, vae
        family = model_family(kind, where)
        if family == "sdxl":
            texts = [CLIPTextModel(CLIPTextConfig(**c)) for c in SDXL_TEXT]
            return "the built-in SDXL-base layout", UNet2DConditionModel(**SDXL_UNET), texts, AutoencoderKL(**M.SD21_VAE)
        if family == "sd15":
            (unet, text), vae = M.sd21_layout(unet=M.SD15_UNET, text=M.SD15_TEXT), AutoencoderKL(**M.SD21_VAE)
            return "the built-in SD 1.5 layout", unet, [text], vae
        (unet, text), vae = M.sd21_layout(), AutoencoderKL(**M.SD21_VAE)
    return "the built-in SD 2.1-base layout", unet, [text], vae


def model_family(kind, where):
    """"sdxl", "sd15" or "sd21" for a hub id or single file, without a download: a .safetensors file by its text
    encoders' keys (SDXL's second encoder, SD 1.x's CLIP `transformer`, else SD 2.x's OpenCLIP), else the name."""
    if kind == "single_file" and where.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(where, "pt") as f:
            keys = list(f.keys())
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl"
        return "sd15" if any(k.startswith("cond_stage_model.transformer.") for k in keys) else "sd21"
    name = Path(where).name.lower()
    if "xl" in name:
        return "sdxl"
    return "sd15" if re.search(r"v1[-_.]?[1-5]\b|sd-?1[-_.]?[45]\b|1\.5", name) else "sd21"
