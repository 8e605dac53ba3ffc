"""AttnDreamBooth (Pang et al., NeurIPS 2024): three training stages in one process.

    accelerate launch train_attndreambooth.py --config configs/attndreambooth.yaml \
        data.instance_dir=path/to/my_dog data.category=dog output_dir=runs/my_dog

Stage 1 learns the [V] embedding, stage 2 the cross-attention layers, stage 3 the whole
U-Net, each with the cross-attention regulariser (Eq. 2). The run folder ends with
config.yaml, train.log, metrics.jsonl, learned_embeds.safetensors, attn2_<stage>.safetensors
and pipeline/ (a diffusers folder that stock StableDiffusionPipeline loads).
"""
import argparse
import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from attndreambooth.config import ConfigError, load_config, to_yaml
from attndreambooth.data import list_images
from attndreambooth.models import model_source

log = logging.getLogger("attndreambooth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); keys not set there keep their defaults")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. stages.stage3.steps=200")
    return p.parse_args(argv)


def count_plan(cfg):
    """Trainable parameter count of each enabled stage, from the model's config on the meta device."""
    import json

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from attndreambooth import models as M

    kind, where = M.model_source(cfg.model)
    if kind == "folder":
        unet_cfg = json.loads((Path(where) / "unet" / "config.json").read_text())
        hidden = CLIPTextConfig.from_pretrained(where, subfolder="text_encoder").hidden_size
        source = where
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
    else:  # hub id or single file: no download for a dry run; the SD 2.1-base layout
        unet, text = M.sd21_layout()
        hidden, source = text.config.hidden_size, "the built-in SD 2.1-base layout"
    sizes = dict(embedding=hidden,
                 cross_attention=sum(p.numel() for n, p in unet.named_parameters() if ".attn2." in n),
                 unet=sum(p.numel() for p in unet.parameters()))
    lines = [f"plan (parameter counts from {source}):"]
    for name, s in cfg.stages.items():
        if s.enabled and s.steps > 0:
            n = sum(sizes[p] for p in s.train)
            lines.append(f"  {name}: train {'+'.join(s.train)} ({n:,} parameters), {s.steps} steps, lr {s.lr:g}, "
                         f"batch {s.batch_size}, reg mean/var weight {s.reg_mean_weight:g}/{s.reg_var_weight:g}")
        else:
            lines.append(f"  {name}: skipped")
    return "\n".join(lines)


def setup_logging(output_dir, is_main):
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def train(cfg):
    """Run every enabled stage in order and write the run folder; returns the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    from attention_reg import CrossAttentionCapture
    from attndreambooth.data import LatentSampler, encode_view_pool
    from attndreambooth.models import add_concept_token, bake_concept, encode_prompt, load_pipeline
    from attndreambooth.sampling import validation_grid
    from attndreambooth.training import Models, Reporter, run_stage

    out = Path(cfg.output_dir)
    world = int(os.environ.get("WORLD_SIZE", 1))
    tensorboard = cfg.runtime.tensorboard and importlib.util.find_spec("tensorboard") is not None
    # accelerate runs several processes without GPUs only when told `cpu` (gloo backend)
    accelerator = Accelerator(mixed_precision=cfg.runtime.mixed_precision,
                              cpu=world > 1 and not torch.cuda.is_available(),
                              log_with="tensorboard" if tensorboard else None, project_dir=str(out))
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched {world} processes but accelerate set up {accelerator.num_processes}; "
                           "each would train alone: check the launcher (accelerate launch / torchrun)")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    accelerator.wait_for_everyone()
    setup_logging(out, accelerator.is_main_process)
    if tensorboard:
        accelerator.init_trackers("tensorboard")
    elif cfg.runtime.tensorboard:
        log.info("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.runtime.allow_tf32
    set_seed(cfg.runtime.seed)

    pipe = load_pipeline(cfg.model)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    token_id, category_ids = add_concept_token(tokenizer, text_encoder, cfg.data.placeholder, cfg.data.category)
    prompt = cfg.data.prompt_template.format(placeholder=cfg.data.placeholder, category=cfg.data.category)
    input_ids, v_pos, cat_pos = encode_prompt(tokenizer, prompt, token_id, category_ids)
    log.info("training prompt %r: [V] at token %d, category at token %d", prompt, v_pos, cat_pos)

    device = accelerator.device
    vae.to(device).requires_grad_(False)
    text_encoder.to(device)
    unet.to(device)
    if cfg.runtime.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.runtime.channels_last:
        unet.to(memory_format=torch.channels_last)
    paths = list_images(cfg.data)
    mean, std = encode_view_pool(vae, paths, cfg.data, cfg.runtime.seed, device)
    log.info("encoded %d views of %d images once (%d each)", mean.shape[0], len(paths), cfg.data.views_per_image)
    vae.to("cpu")  # the VAE leaves the training device
    gen = torch.Generator().manual_seed(cfg.runtime.seed * 1000 + accelerator.process_index)
    sampler = LatentSampler(mean, std, len(paths), vae.config.scaling_factor, gen)

    capture = None  # without the regulariser every layer keeps the stock (SDPA) processor
    if cfg.reg.enabled:
        capture = CrossAttentionCapture(unet, [v_pos, cat_pos], expected_layers=cfg.model.cross_attention_layers)
    models = Models(unet, text_encoder, noise_scheduler, capture, input_ids.to(device))
    concept = text_encoder.get_input_embeddings()
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=pipe.scheduler)

    def validate(name, step, global_step):
        if accelerator.is_main_process:
            grid = validation_grid(components, f"{cfg.data.placeholder} {cfg.data.category}", cfg.validation,
                                   device, accelerator.autocast())
            (out / "validation").mkdir(exist_ok=True)
            grid.save(out / "validation" / f"{name}_{step:05d}.png")
            if tensorboard:
                accelerator.get_tracker("tensorboard").log_images(
                    {f"validation/{name}": np.asarray(grid)[None]}, step=global_step, dataformats="NHWC")
        if capture is not None:
            capture.clear()
        accelerator.wait_for_everyone()

    reporter = Reporter(out, accelerator, cfg, validate)
    with capture or contextlib.nullcontext():
        if cfg.runtime.compile and device.type == "cpu":
            log.warning("runtime.compile is ignored on a CPU (compilation would cost more than it saves)")
        elif cfg.runtime.compile:
            unet.compile()  # in place: the module, its processors and state-dict keys stay the same
        for name, stage in cfg.stages.items():
            if not stage.enabled or stage.steps == 0:
                log.info("%s: skipped", name)
                continue
            seconds, peak = run_stage(name, stage, models, sampler, accelerator, cfg, reporter)
            log.info("%s done: %d steps in %.1f s, peak %s memory %.2f GiB", name, stage.steps, seconds,
                     "GPU" if device.type == "cuda" else "process", peak)
            if accelerator.is_main_process and "cross_attention" in stage.train:
                attn2 = {n: p.detach().cpu().contiguous() for n, p in unet.state_dict().items() if ".attn2." in n}
                save_file(attn2, out / f"attn2_{name}.safetensors")
            if accelerator.is_main_process and "embedding" in stage.train:
                save_file({cfg.data.placeholder: concept.row.detach().cpu().clone()}, out / "learned_embeds.safetensors")
    reporter.close()

    if accelerator.is_main_process:
        row = concept.row.detach().cpu().clone()
        save_file({cfg.data.placeholder: row}, out / "learned_embeds.safetensors")  # diffusers' format
        save_file({"emb_params": row[None]}, out / "embedding_a1111.safetensors")  # AUTOMATIC1111 / ComfyUI
        pipe.text_encoder = bake_concept(text_encoder)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.runtime.pipeline_dtype]
        pipe.to("cpu", dtype).save_pretrained(out / "pipeline", safe_serialization=True)
        log.info("saved %s (load with StableDiffusionPipeline.from_pretrained)", out / "pipeline")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        list_images(cfg.data)  # fail on bad data before any weights load
        model_source(cfg.model)
        out = Path(cfg.output_dir)
        if not args.dry_run and out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"output_dir {out} already holds files; choose a new output_dir "
                              "(an earlier run is never overwritten)")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.dry_run:
        print(to_yaml(cfg))
        print(count_plan(cfg))
        return None
    return train(cfg)


if __name__ == "__main__":
    main()
