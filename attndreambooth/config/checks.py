"""The config's values checked, each problem named by its key: impossible values, parts and presets that do not
exist, an output folder that cannot be written. Cheap checks only: no model loads here."""
import importlib.util
import math
import os
from pathlib import Path

import torch
from PIL import ImageColor

from attention_reg import REDUCTIONS
from attndreambooth.config.schema import (CARD_PRESETS, COMPILE_MODES, MEMORY_PRESETS, PRECISIONS, TRACKERS, TRAINABLE_PARTS,
                                          Config, ConfigError)
from attndreambooth.config.plan import DTYPES, UNET_PARTS, Plan


def validate(cfg: Config, card_pending=False):
    """Impossible values, each named by its key. Cheap checks only: no model is loaded. `card_pending`: a card
    preset is still to give the U-Net stages their LoRA ranks (preflight.fit_memory checks again after)."""
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"config key {key!r}: {what}")

    d = cfg.data
    need(bool(d.category.strip()), "data.category", "is empty; give the class word, e.g. dog")
    need(d.placeholder.strip() and not any(ch.isspace() for ch in d.placeholder), "data.placeholder",
         f"{d.placeholder!r} must be one word without spaces, e.g. <v>")
    need(d.prompt_template.count("{placeholder}") == 1, "data.prompt_template",
         f"{d.prompt_template!r} must contain {{placeholder}} exactly once")
    t = d.prompt_template
    need(not cfg.reg.enabled or t.find("{category}") > t.find("{placeholder}"), "data.prompt_template",
         f"{t!r} needs {{category}} after {{placeholder}}: the regulariser compares their attention maps")
    need(not os.path.isfile(d.instance_dir), "data.instance_dir", f"{d.instance_dir} is a file; give the folder of photos")
    need(os.path.isdir(d.instance_dir), "data.instance_dir", f"folder {d.instance_dir} does not exist")
    need(d.resolution >= 8 and d.resolution % 8 == 0, "data.resolution", f"{d.resolution} must be a positive multiple of 8")
    need(d.views_per_image >= 1, "data.views_per_image", f"{d.views_per_image} must be >= 1")
    a = d.augment
    for key in ("rotate_prob", "flip_prob"):
        need(0 <= getattr(a, key) <= 1, f"data.augment.{key}", f"{getattr(a, key)} is not a probability in [0, 1]")
    need(0 <= a.max_rotation_deg <= 180, "data.augment.max_rotation_deg", "must be in [0, 180]")
    vae = cfg.model.vae
    need(vae is None or os.path.isdir(os.path.expanduser(vae)) or looks_like_hub_id(vae), "model.vae",
         f"{vae!r} is neither a diffusers VAE folder nor a hub id (owner/name)")
    need(cfg.reg.reduction in REDUCTIONS, "reg.reduction", f"{cfg.reg.reduction!r} is not one of {REDUCTIONS}")
    need(cfg.reg.map_sizes is None or (cfg.reg.map_sizes and all(s >= 1 for s in cfg.reg.map_sizes)), "reg.map_sizes",
         f"{cfg.reg.map_sizes} must be null (every layer) or a list of map sides, e.g. [32, 16]")
    pr = cfg.prior
    if pr.enabled:
        need(pr.num_class_images >= 1, "prior.num_class_images", f"{pr.num_class_images} must be >= 1")
        need(math.isfinite(pr.weight) and pr.weight > 0, "prior.weight", f"{pr.weight} must be a number > 0 "
             "(to train without the prior, set prior.enabled=false)")
        need(pr.steps >= 1, "prior.steps", f"{pr.steps} must be >= 1")
        need(pr.class_dir is None or not os.path.isfile(os.path.expanduser(pr.class_dir)), "prior.class_dir",
             f"{pr.class_dir} is a file; give a folder (of class images, or for the ones generated here)")
        need(pr.class_prompt is None or (pr.class_prompt.strip() and "{placeholder}" not in pr.class_prompt),
             "prior.class_prompt", f"{pr.class_prompt!r} must be a prompt of the class alone, without [V]")
        need(any(st.enabled and set(st.train) & set(UNET_PARTS) for st in cfg.stages.values()),
             "prior.enabled", "no enabled stage trains U-Net weights, so the prior loss would never apply")
        need(not cfg.runtime.cuda_graph, "runtime.cuda_graph", "is not built for prior preservation's second "
             "batch; set runtime.cuda_graph=false or prior.enabled=false")
    need(cfg.runtime.mixed_precision in PRECISIONS, "runtime.mixed_precision",
         f"{cfg.runtime.mixed_precision!r} is not one of {PRECISIONS}")
    for name in cfg.runtime.report_to:
        need(name in TRACKERS, "runtime.report_to", f"{name!r} is not one of accelerate's trackers {TRACKERS}")
        need(name == "tensorboard" or importlib.util.find_spec(name) is not None, "runtime.report_to",
             f"{name} is not installed: pip install {name.replace('_', '-')}, or take it out of the list")
    need(cfg.runtime.compile in COMPILE_MODES, "runtime.compile",
         f"{cfg.runtime.compile!r} is not one of {COMPILE_MODES} (true means full, false off)")
    need(not cfg.runtime.cuda_graph or torch.cuda.is_available(), "runtime.cuda_graph",
         "captures the training step as a CUDA graph, and this machine has no CUDA device; set it to false")
    need(not cfg.runtime.cuda_graph or cfg.runtime.mixed_precision != "fp16", "runtime.cuda_graph",
         "cannot capture fp16's gradient scaler (its step reads the inf check back to the host); use bf16")
    need(not cfg.runtime.cuda_graph or not cfg.runtime.optimizer_8bit, "runtime.cuda_graph",
         "needs a capturable optimizer (torch's AdamW), not 8-bit AdamW; set runtime.optimizer_8bit=false")
    need(cfg.runtime.max_grad_norm is None or cfg.runtime.max_grad_norm > 0, "runtime.max_grad_norm", "must be > 0 or null")
    need(cfg.runtime.memory in (*MEMORY_PRESETS, *CARD_PRESETS), "runtime.memory",
         f"{cfg.runtime.memory!r} is not one of {(*MEMORY_PRESETS, *CARD_PRESETS)}")
    need(not cfg.runtime.half_frozen_weights or cfg.runtime.mixed_precision != "no", "runtime.half_frozen_weights",
         "keeps frozen weights in the autocast dtype; set runtime.mixed_precision=bf16 (or fp16)")
    need(not cfg.runtime.optimizer_8bit or importlib.util.find_spec("bitsandbytes") is not None,
         "runtime.optimizer_8bit", "8-bit AdamW needs bitsandbytes: pip install bitsandbytes, "
         "or set runtime.optimizer_8bit=false (the low preset then only checkpoints gradients)")
    need(cfg.runtime.pipeline_dtype in DTYPES, "runtime.pipeline_dtype",
         f"{cfg.runtime.pipeline_dtype!r} is not one of {tuple(DTYPES)}")
    v = cfg.validation
    need(v.every_steps >= 0 and v.num_images >= 1 and v.steps >= 1, "validation",
         "every_steps must be >= 0, num_images and steps >= 1")
    for key, value in (("runtime.seed", cfg.runtime.seed), ("validation.seed", v.seed)):
        need(seed_problem(value) is None, key, seed_problem(value))
    need(guidance_problem(v.guidance_scale) is None, "validation.guidance_scale", guidance_problem(v.guidance_scale))
    need(cfg.runtime.checkpoint_every_steps >= 0, "runtime.checkpoint_every_steps", "must be >= 0")
    need(cfg.runtime.keep_checkpoints >= 1, "runtime.keep_checkpoints", "must be >= 1")
    need(d.min_image_size >= 1, "data.min_image_size", "must be >= 1")
    try:
        ImageColor.getrgb(d.alpha_background)
    except ValueError:
        need(False, "data.alpha_background", f"{d.alpha_background!r} is not a colour (e.g. white or #808080)")
    need(cfg.runtime.log_every_steps >= 1, "runtime.log_every_steps", "must be >= 1")
    need(bool(Plan(cfg.stages)), "stages", "no stage is enabled with steps > 0")
    for name, s in cfg.stages.items():
        key = f"stages.{name}"
        need(s.steps >= 0, f"{key}.steps", f"{s.steps} is negative")
        need(s.lr > 0, f"{key}.lr", f"{s.lr} must be > 0")
        need(s.batch_size >= 1, f"{key}.batch_size", f"{s.batch_size} must be >= 1")
        need(s.reg_mean_weight >= 0 and s.reg_var_weight >= 0, f"{key}.reg_*_weight", "weights must be >= 0")
        need(s.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        need(len(s.train) > 0 and all(p in TRAINABLE_PARTS for p in s.train), f"{key}.train",
             f"{s.train} must list parts from {TRAINABLE_PARTS}")
        need(s.lora_rank is None or s.lora_rank >= 0, f"{key}.lora_rank", f"{s.lora_rank} must be >= 0 (0 = full weights)")
        need(not s.lora_rank or UNET_PARTS & set(s.train), f"{key}.lora_rank",
             f"LoRA adapts U-Net weights, but this stage trains only {s.train}; set it to 0")
        need(s.lora_alpha is None or s.lora_alpha > 0, f"{key}.lora_alpha", "must be > 0 or null (= the rank)")
    unet_stages = {s.name: s.lora for s in Plan(cfg.stages) if UNET_PARTS & set(s.config.train)}
    need(card_pending or len(set(unet_stages.values())) <= 1, "stages.<name>.lora_rank",
         f"every stage that trains U-Net weights must use LoRA, or none ({unet_stages}): a LoRA file cannot "
         "hold full-weight changes; give them all a lora_rank or set it to 0")
    need(not any(unet_stages.values()) or importlib.util.find_spec("peft") is not None, "stages.<name>.lora_rank",
         "LoRA stages need peft: pip install peft")
    problem = folder_problem(cfg.output_dir)
    need(problem is None, "output_dir", problem)


def seed_problem(seed):
    """Why `seed` cannot seed every generator a run or a sample uses (None: it can): accelerate's set_seed and
    NumPy take 0 .. 2**32 - 1."""
    return None if 0 <= seed < 2**32 else f"{seed} must be in 0 .. {2**32 - 1} (what NumPy and accelerate accept)"


def guidance_problem(scale):
    """Why a classifier-free guidance scale would not do what it says (None: it would): diffusers guides only
    above 1, so 0.5 or a negative scale would sample without guidance, silently."""
    if not math.isfinite(scale) or scale < 1:
        return (f"{scale} would switch classifier-free guidance off (diffusers guides only above 1); give 1 for "
                "no guidance, or more than 1 (7.5 is usual)")
    return None


def looks_like_hub_id(name):
    """owner/name and not a path: one slash, no leading ., / or ~, and nothing of that name on disk."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def folder_problem(path):
    """Why `path` cannot be, or become, a folder this process writes into (None: it can); for every output
    option, said before anything loads."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return (f"{path} is a file; give a folder" if existing == path
                else f"{path} would be inside {existing}, which is a file; give a folder")
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable; give a folder you can write to"
    return None
