"""Everything checked before any weights load: data, tokens, the disk, the plan (the run folder's own checks
are trainer.run_folder's); then the folder claimed."""
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from attndreambooth.config.checks import looks_like_hub_id
from attndreambooth.config.plan import DTYPES, UNET_PARTS, Plan
from attndreambooth.config.schema import ConfigError
from attndreambooth.families.source import meta_models, model_source
from attndreambooth.inference.generate import concept_position
from attndreambooth.trainer.checkpoint import size_text
from attndreambooth.trainer.concept import is_known_word
from attndreambooth.trainer.data import fingerprint, list_images
from attndreambooth.trainer.lora import adapter_part, lora_parameter_count, narrowest_target
from attndreambooth.trainer.map_sizes import latent_side, regularised_layers, vae_factor
from attndreambooth.trainer.run_folder import (IMAGES_FILE, check_checkpoint_fits, check_same_images, check_world,
                                               hold_folder, run_folder_state)

log = logging.getLogger(__name__)


def parameter_sizes(cfg, layout=None, plan=None):
    """Parameter counts: [V]'s row(s), the cross-attention layers, U-Net, text encoder(s), whole pipeline, each
    LoRA stage's adapter."""
    m = layout or meta_models(cfg)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    linear = lambda module: sum(layer.weight.numel() for layer in module.modules()  # noqa: E731
                                if isinstance(layer, torch.nn.Linear))  # what runtime.quantize_base stores in 8 bits
    per_rank = {part: lora_parameter_count(m.unet, part, m.family) for part in UNET_PARTS}
    lora = {s.name: per_rank[adapter_part(s.config)] * s.config.lora_rank for s in plan or Plan(cfg.stages) if s.lora}
    text = sum(count(t) for t in m.text_encoders)
    cross = sum(p.numel() for n, p in m.unet.named_parameters() if m.family.is_cross_attention(n))
    return m.source, dict(embedding=sum(t.config.hidden_size for t in m.text_encoders), unet=count(m.unet),
                          text=text, unet_linear=linear(m.unet), text_linear=sum(linear(t) for t in m.text_encoders),
                          cross_attention=cross, pipeline=count(m.unet) + text + count(m.vae), lora=lora,
                          lora_per_rank=per_rank)


def memory_sizes(cfg, layout=None, plan=None):
    """parameter_sizes plus the activations of one sample at data.resolution (the memory estimate): the U-Net's
    leaf outputs counted, or for a transformer the bytes autograd keeps, per part a stage trains."""
    from attndreambooth.trainer.memory import activation_elements
    layout = layout or meta_models(cfg)
    source, sizes = parameter_sizes(cfg, layout, plan)
    side, family = latent_side(layout.vae.config, cfg.data.resolution), layout.family
    if not family.memory_by_accounting:
        sizes["activations"] = activation_elements(layout.unet, side, family)
        return source, sizes
    from attndreambooth.trainer.saved_tensors import denoiser_step, text_step
    dtype = DTYPES[cfg.runtime.mixed_precision] if cfg.runtime.mixed_precision != "no" else DTYPES["fp32"]
    trains = {None: lambda n: False, "cross_attention": family.is_cross_attention, "unet": lambda n: True}
    sizes["saved"] = {part: denoiser_step(family, layout.unet, side, dtype, t) for part, t in trains.items()}
    sizes["text_saved"] = text_step(family, layout.text_encoders, dtype)["total"]
    return source, sizes


def installed_extras():
    """Whether the optional packages memory savers need are installed (8-bit AdamW, 8-bit weights)."""
    import importlib.util
    return {p: importlib.util.find_spec(p) is not None for p in ("bitsandbytes", "torchao")}


def fit_memory(cfg):
    """Resolve a card preset (runtime.memory=12gb...80gb) for this model, then check the config again."""
    from attndreambooth.config.checks import validate
    from attndreambooth.config.schema import CARD_PRESETS
    from attndreambooth.trainer.memory import current_savers, describe, fit_card, stage_peaks
    if cfg.runtime.memory in CARD_PRESETS:
        _, sizes = memory_sizes(cfg)
        fit_card(cfg, sizes, installed_extras())
        validate(cfg)
        plan = Plan(cfg.stages)  # what will run, read back from the resolved config, explicit settings included
        savers, ranks = current_savers(cfg, plan), sorted({s.config.lora_rank for s in plan if s.lora})
        log.info("runtime.memory=%s: %s (estimated peak %.1f GiB)", cfg.runtime.memory, describe(savers, ranks),
                 max(stage_peaks(sizes, plan, savers, cfg.runtime.mixed_precision).values()))
    for s in Plan(cfg.stages):
        if s.lora and s.config.lr < 1e-5:
            log.warning("stages.%s: LoRA at lr %g, a full-weight learning rate; LoRA factors usually need about "
                        "1e-4 (diffusers' LoRA scripts): set stages.%s.lr", s.name, s.config.lr, s.name)
    return cfg


def stage_parameters(sizes, planned):
    """Trainable parameters of a planned stage (a LoRA stage: its adapter instead of the U-Net weights)."""
    s = planned.config
    if planned.lora:
        return sizes["lora"][planned.name] + sum(sizes[p] for p in s.train if p not in UNET_PARTS)
    return sum(sizes[p] for p in s.train)


def plan_text(cfg, plan, layout=None):
    """The stages with their trainable parameter counts and estimated peak GPU memory, for --dry_run."""
    from attndreambooth.trainer.memory import card_summary, current_savers, stage_peaks
    layout = layout or meta_models(cfg)
    source, sizes = memory_sizes(cfg, layout, plan)
    planned = {s.name: s for s in plan}
    peaks = stage_peaks(sizes, plan, current_savers(cfg, plan), cfg.runtime.mixed_precision)
    lines = [f"plan (parameter counts from {source}; peak GPU memory estimated from parameter and activation "
             "counts, see attndreambooth/trainer/memory.py):"]
    for name in cfg.stages:
        if name in planned:
            s = planned[name].config
            n = stage_parameters(sizes, planned[name])
            what = "+".join(s.train) + (f", LoRA rank {s.lora_rank}" if planned[name].lora else "")
            lines.append(f"  {name}: train {what} ({n:,} parameters), {s.steps} steps, lr {s.lr:g}, "
                         f"batch {s.batch_size}, reg mean/var weight {s.reg_mean_weight:g}/{s.reg_var_weight:g}"
                         + f", peak ~{peaks[name]:.1f} GiB")
        else:
            lines.append(f"  {name}: skipped")
    lines.append(card_summary(cfg, sizes, installed_extras()))
    if cfg.prior.enabled:
        from attndreambooth.trainer.prior import class_image_estimate
        lines.append(class_image_estimate(cfg))
    return "\n".join(lines)


def check_tokens(cfg):
    """Placeholder, category and prompt against the model's tokenizer (a few KB, loaded alone)."""
    from transformers import CLIPTokenizer
    kind, where = model_source(cfg.model)
    if kind == "single_file" and not cfg.model.single_file_config:
        return  # the tokenizer comes with the checkpoint's pipeline; checked when it loads
    tokenizer = CLIPTokenizer.from_pretrained(cfg.model.single_file_config or where, subfolder="tokenizer",
                                              revision=cfg.model.revision)
    d = cfg.data
    if is_known_word(tokenizer, d.placeholder):
        raise ConfigError(f"config key 'data.placeholder': {d.placeholder!r} is already a word of the tokenizer's "
                          "vocabulary; choose a new one, e.g. <v> or <my-dog>")
    cat = tokenizer.tokenize(d.category)
    if len(cat) > 1:
        log.warning("data.category %r is %d tokens %s: [V] starts from the first, %r, and the regulariser compares "
                    "[V] with it (as the released code)", d.category, len(cat), cat, cat[0])
    prompt = d.prompt_template.format(placeholder=d.placeholder, category=d.category)
    n = len(tokenizer(prompt).input_ids) + len(tokenizer.tokenize(d.placeholder)) - 1  # [V] becomes one token
    if n > tokenizer.model_max_length:
        raise ConfigError(f"config key 'data.prompt_template': the training prompt {prompt!r} is {n} tokens, over "
                          f"the text encoder's {tokenizer.model_max_length}; shorten it")
    for template in cfg.validation.prompts if cfg.validation.every_steps else ():
        if "{}" in template and concept_position(tokenizer, template, d.placeholder) >= tokenizer.model_max_length - 1:
            raise ConfigError(f"config key 'validation.prompts': in {template!r} the concept falls past the text "
                              f"encoder's {tokenizer.model_max_length} tokens and would be cut off; shorten it")


def check_disk(cfg, plan, layout=None):
    """Refuse early when the final artefacts plus the resume checkpoints cannot fit on the disk."""
    _, sizes = parameter_sizes(cfg, layout, plan)
    parts = plan.trained_parts()
    trained = sizes["unet"] if "unet" in parts else sizes["cross_attention"] if "cross_attention" in parts else 0
    if plan.lora:  # the adapters instead of the U-Net weights; the pipeline only when asked for
        trained = sum(sizes["lora"].values())
    largest_stage = max((stage_parameters(sizes, s) for s in plan), default=0)
    bytes_per = DTYPES[cfg.runtime.pipeline_dtype].itemsize
    checkpoint = 4 * (trained + sizes["embedding"]) + 8 * largest_stage  # weights + AdamW moments, fp32
    pipeline = 0 if plan.lora and not cfg.runtime.save_merged_pipeline else sizes["pipeline"] * bytes_per
    stage_files = 4 * trained * len(sizes["lora"]) if plan.lora else 4 * sizes["cross_attention"]  # attn2 / lora_<stage>
    need = pipeline + stage_files + (cfg.runtime.keep_checkpoints + 1) * checkpoint
    parent = next(p for p in [Path(cfg.output_dir), *Path(cfg.output_dir).parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if need > free:
        raise ConfigError(f"output_dir: the run needs about {size_text(need)} ({cfg.runtime.keep_checkpoints} "
                          f"resume checkpoints of {size_text(checkpoint)} and the final pipeline) but "
                          f"{parent} has {size_text(free)} free; free space, use another disk, or lower "
                          "runtime.keep_checkpoints")
    return need


def check_inputs(cfg, download=True):
    """The checks that need no weights and write nothing (also --dry_run's): images, model path, tokens, the
    regularised layers. Returns the images and the model's layout on the meta device. download=False skips
    the token check for a hub id (it would fetch the tokenizer)."""
    paths = list_images(cfg.data)
    if cfg.prior.enabled:
        from attndreambooth.trainer.prior import check_class_images
        check_class_images(cfg)
    kind, where = model_source(cfg.model)
    if kind == "hub" and download:  # a typo'd id, no network or a gated model: said before the folder is claimed
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.load_config(where, revision=cfg.model.revision)  # model_index.json, a few hundred bytes
        except OSError as e:
            raise ConfigError(f"config key 'model.pretrained': {where!r} cannot be fetched ({str(e).splitlines()[0]}); "
                              "check the hub id, the network (or HF_TOKEN for a gated model), or give a local "
                              "diffusers folder") from None
    if download or kind != "hub":
        check_tokens(cfg)
    vae_config = None  # model.vae's config.json; a hub id's only when downloads are allowed
    if cfg.model.vae and (download or not looks_like_hub_id(cfg.model.vae)):
        vae_config = read_vae_config(cfg.model.vae)
    layout = meta_models(cfg)  # built once for the checks below
    if vae_config is not None:
        check_vae_fits(cfg.model.vae, vae_config, layout.vae.config)
    check_family_options(cfg, layout)
    check_sizes(cfg, layout)
    if cfg.reg.enabled:  # the layer selection against the model's layout, before weights load
        regularised_layers(layout.family, layout.unet, cfg.reg, latent_side(layout.vae.config, cfg.data.resolution))
    return paths, layout


def check_family_options(cfg, layout):
    """Options the model's family cannot honour: an option of the U-Net families on a transformer, a guidance
    value for a model without a guidance input."""
    family = layout.family
    for key, off in family.sd_only_options:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != off:
            raise ConfigError(f"config key '{key}': {value} is an option of the U-Net models (SD, SDXL) that "
                              f"{family.model_kind} does not have; remove it (or set it to {off})")
    if cfg.model.guidance is not None and not layout.unet.config.get("guidance_embeds", False):
        raise ConfigError(f"config key 'model.guidance': {cfg.model.guidance} is given but this model has no guidance "
                          "input (only guidance-distilled models such as FLUX.1-dev have one); remove the key")


def check_sizes(cfg, layout):
    """Numbers that must fit the model: the resolution a multiple of its VAE's factor times the denoiser's
    patch (else the latent is cut), each LoRA rank the narrowest layer its adapter adapts."""
    factor, patch = vae_factor(layout.vae.config) * layout.family.patch, layout.family.patch
    if cfg.data.resolution % factor:
        near = sorted({max(factor, cfg.data.resolution // factor * factor), -(-cfg.data.resolution // factor) * factor})
        what = f"VAE factor {factor}" if patch == 1 else f"VAE factor times patch, {factor}"
        raise ConfigError(f"config key 'data.resolution': {cfg.data.resolution} is not a multiple of this model's "
                          f"{what} (the latent would be cut); use {' or '.join(map(str, near))}")
    for s in Plan(cfg.stages):
        if s.lora:
            name, width = narrowest_target(layout.unet, adapter_part(s.config), layout.family)
            if s.config.lora_rank > width:
                raise ConfigError(f"config key 'stages.{s.name}.lora_rank': {s.config.lora_rank} is more than the "
                                  f"width of the narrowest layer it adapts ({name}: {width}); a rank above a layer's "
                                  f"width adds parameters and no capacity: use at most {width}")


def preflight(cfg, plan):
    """All checks that need no weights, then the run folder claimed (locked; for resume=false the earlier
    run moved aside, only now that everything else passed). Returns the folder's state ('new', 'resume',
    'finished'), the checked instance images, the lock (keep it for the process's life) and, for a finished
    run, the work its changed options ask for (trainer/finished.py)."""
    from attndreambooth.trainer.finished import finished_work
    paths, layout = check_inputs(cfg)
    check_world(plan, cfg.runtime.cuda_graph)
    state, changes = run_folder_state(cfg)
    work = finished_work(cfg, plan, changes) if state == "finished" else []
    if state == "resume":
        check_same_images(cfg, paths)
        check_checkpoint_fits(cfg, plan)
    if state != "finished":
        check_disk(cfg, plan, layout)
    if state == "finished" and not work:  # nothing will be written
        return state, paths, None, work
    if int(os.environ.get("RANK", 0)) != 0:  # under a launcher, rank 0 claims the folder for all
        return ("new" if state == "replace" else state), paths, None, work
    out = Path(cfg.output_dir)
    lock = hold_folder(out)
    if state == "replace":
        aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)  # the lock file moves with it; this process still holds it
        lock.close()
        lock = hold_folder(out)
        log.warning("resume=false: the earlier run in %s was moved to %s", out, aside)
        state = "new"
    if state == "new" or not (out / IMAGES_FILE).is_file():  # what a resume must find again
        (out / IMAGES_FILE).write_text(json.dumps(fingerprint(paths), indent=1))
    return state, paths, lock, work


def read_vae_config(vae):
    """model.vae's config.json (a few hundred bytes, fetched alone for a hub id); one line when it is not a
    diffusers VAE (a U-Net or pipeline folder, an unreachable id)."""
    from diffusers import AutoencoderKL
    try:
        config = AutoencoderKL.load_config(os.path.expanduser(vae))
    except (OSError, ValueError) as e:
        whole = Path(os.path.expanduser(vae), "vae", "config.json").is_file()
        raise ConfigError(f"config key 'model.vae': {vae!r} cannot be read as a diffusers VAE ("
                          + ("it is a whole pipeline: give its vae/ folder" if whole else str(e).splitlines()[0])
                          + "); give a VAE folder (config.json + weights) or a hub id that holds one") from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"config key 'model.vae': {vae!r} holds a {config['_class_name']}, not a VAE "
                          "(AutoencoderKL); give the VAE's folder, e.g. the base's vae/ or a fine-tuned VAE")
    return config


def check_vae_fits(vae, config, base):
    """A VAE the U-Net can use in place of the base's: the same downsampling factor (the latent size), latent
    channels (the U-Net's input) and scaling (the latents' magnitude the U-Net was trained on)."""
    def fields(c):  # a dict (config.json) or diffusers' FrozenDict: both have .get
        return {"downsampling factor": vae_factor(c), "latent channels": c.get("latent_channels", 4),
                "scaling factor": c.get("scaling_factor", 0.18215)}
    ours, theirs = fields(dict(config)), fields(dict(base))
    wrong = [f"{k} {ours[k]:g} (the base's: {theirs[k]:g})" for k in ours if ours[k] != theirs[k]]
    if wrong:
        raise ConfigError(f"config key 'model.vae': {vae!r} does not fit the base model's U-Net: its "
                          f"{', '.join(wrong)}; give a VAE made for this base (e.g. a fine-tune of its own), or "
                          "leave model.vae unset")
