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
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from attndreambooth.config import ConfigError, load_config, to_yaml
from attndreambooth.data import list_images
from attndreambooth.training import NonFiniteLoss

log = logging.getLogger("attndreambooth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); keys not set there keep their defaults")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. stages.stage3.steps=200")
    return p.parse_args(argv)


def setup_logging(output_dir, is_main):
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def save_atomic(tensors, path):
    """safetensors written under a temporary name, then renamed: a kill leaves the old file or the new."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def prepare(cfg, accelerator, paths):
    """Load the model, add [V], encode the view pool once, install the hook; returns (pipe, models, sampler)."""
    from diffusers import DDPMScheduler

    from attention_reg import CrossAttentionCapture
    from attndreambooth.data import LatentSampler, encode_view_pool
    from attndreambooth.models import add_concept_token, encode_prompt, load_pipeline
    from attndreambooth.training import Models

    pipe = load_pipeline(cfg.model)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    token_id, category_ids = add_concept_token(tokenizer, text_encoder, cfg.data.placeholder, cfg.data.category,
                                               cfg.data.init_token)
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
    mean, std = encode_view_pool(vae, paths, cfg.data, cfg.runtime.seed, device)
    log.info("encoded %d views of %d images once (%d each)", mean.shape[0], len(paths), cfg.data.views_per_image)
    vae.to("cpu")  # the VAE leaves the training device
    gen = torch.Generator().manual_seed(cfg.runtime.seed * 1000 + accelerator.process_index)
    sampler = LatentSampler(mean, std, len(paths), vae.config.scaling_factor, gen)
    capture = None  # without the regulariser every layer keeps the stock (SDPA) processor
    if cfg.reg.enabled:
        capture = CrossAttentionCapture(unet, [v_pos, cat_pos], expected_layers=cfg.model.cross_attention_layers)
    models = Models(unet, text_encoder, DDPMScheduler.from_config(pipe.scheduler.config), capture,
                    input_ids.to(device))
    return pipe, models, sampler


def restore(checkpointer, models, sampler, accelerator):
    """Load the latest checkpoint into the models and the sampler; returns (meta, optimizer state) or Nones."""
    from attndreambooth.checkpoint import Checkpointer
    from attndreambooth.training import restore_weights

    latest = checkpointer.latest()
    if latest is None:
        return None, None
    meta, weights, optimizer_state, rng = Checkpointer.load(latest)
    restore_weights(weights, models)
    sampler.gen.set_state(rng[f"rng.sampler.{accelerator.process_index}"])
    sampler.order = list(meta["orders"][accelerator.process_index])
    torch.set_rng_state(rng["rng.torch"])
    log.info("resuming from %s: %s step %d", latest, meta["stage"], meta["step"])
    return meta, optimizer_state


def save_final(cfg, pipe, concept, out):
    """The slim artefacts: the embedding in two formats and the complete pipeline, written atomically."""
    from attndreambooth.models import TORCH_DTYPES, bake_concept
    save_atomic({cfg.data.placeholder: concept.row}, out / "learned_embeds.safetensors")  # diffusers' format
    save_atomic({"emb_params": concept.row[None]}, out / "embedding_a1111.safetensors")  # A1111 / ComfyUI
    pipe.text_encoder = bake_concept(pipe.text_encoder)
    dtype = TORCH_DTYPES[cfg.runtime.pipeline_dtype]
    shutil.rmtree(out / ".tmp-pipeline", ignore_errors=True)
    pipe.to("cpu", dtype).save_pretrained(out / ".tmp-pipeline", safe_serialization=True)
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    os.replace(out / ".tmp-pipeline", out / "pipeline")
    log.info("saved %s (load with StableDiffusionPipeline.from_pretrained)", out / "pipeline")


def train(cfg, state, paths):
    """Run every enabled stage in order on the instance images `paths` (continuing from the last
    checkpoint when `state` is 'resume') and write the run folder; returns the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from attention_reg import compile_unet
    from attndreambooth.checkpoint import Checkpointer, fault_point
    from attndreambooth.preflight import mark_finished
    from attndreambooth.sampling import validation_grid
    from attndreambooth.training import Reporter, run_stage, trained_weights

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
    if cfg.runtime.mixed_precision == "fp16" and accelerator.scaler is None:
        raise ConfigError("config key 'runtime.mixed_precision': fp16 needs a gradient scaler, which accelerate "
                          "gives on CUDA only (fp32 weights with unscaled fp16 gradients underflow); use bf16")
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

    pipe, models, sampler = prepare(cfg, accelerator, paths)
    device, capture, concept = accelerator.device, models.capture, models.text_encoder.get_input_embeddings()
    components = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                      scheduler=pipe.scheduler)

    def validate(name, step, global_step):
        if accelerator.is_main_process:  # eager and with the stock processors: no maps, no recompilation
            with capture.paused() if capture else contextlib.nullcontext(), torch.compiler.set_stance("force_eager"):
                grid = validation_grid(components, f"{cfg.data.placeholder} {cfg.data.category}", cfg.validation,
                                       device, accelerator.autocast())
            (out / "validation").mkdir(exist_ok=True)
            grid.save(out / "validation" / f"{name}_{step:05d}.png")
            if tensorboard:
                accelerator.get_tracker("tensorboard").log_images(
                    {f"validation/{name}": np.asarray(grid)[None]}, step=global_step, dataformats="NHWC")
        accelerator.wait_for_everyone()

    checkpointer = Checkpointer(out, cfg.runtime.keep_checkpoints)
    meta, optimizer_state = restore(checkpointer, models, sampler, accelerator) if state == "resume" else (None, None)
    if accelerator.is_main_process:
        checkpointer.clean_partial()
        keep_lines = meta["global_step"] if meta else 0  # metrics after the checkpoint are redone
        lines = (out / "metrics.jsonl").read_text().splitlines(True) if (out / "metrics.jsonl").exists() else []
        (out / "metrics.jsonl").write_text("".join(lines[:keep_lines]))
    reporter = Reporter(out, accelerator, cfg, validate)
    reporter.global_step = meta["global_step"] if meta else 0
    names = [n for n, s in cfg.stages.items() if s.enabled and s.steps > 0]
    # a checkpoint holds the [V] row and everything trained so far
    parts_until = {n: {"embedding", *(p for m in names[:i + 1] for p in cfg.stages[m].train)} for i, n in enumerate(names)}

    def save_checkpoint(name, step, optimizer, done=False):
        samplers = gather_object([(sampler.gen.get_state(), list(sampler.order))])  # every rank's data stream
        if accelerator.is_main_process:
            checkpointer.save(dict(stage=name, step=step, done=done, global_step=reporter.global_step),
                              trained_weights(parts_until[name], models), optimizer, samplers)
        accelerator.wait_for_everyone()

    with capture or contextlib.nullcontext():
        if cfg.runtime.compile and device.type == "cpu":
            log.warning("runtime.compile is ignored on a CPU (compilation would cost more than it saves)")
        elif cfg.runtime.compile:
            compile_unet(models.unet)
        for name in names:
            stage = cfg.stages[name]
            if meta and (names.index(name) < names.index(meta["stage"]) or (name == meta["stage"] and meta["done"])):
                log.info("%s: already done", name)
                continue
            resuming = meta is not None and name == meta["stage"]
            seconds, peak = run_stage(name, stage, models, sampler, accelerator, cfg, reporter,
                                      start_step=meta["step"] if resuming else 0,
                                      optimizer_state=optimizer_state if resuming else None,
                                      checkpoint=save_checkpoint)
            log.info("%s done: %d steps in %.1f s, peak %s memory %.2f GiB", name, stage.steps, seconds,
                     "GPU" if device.type == "cuda" else "process", peak)
            if accelerator.is_main_process and "cross_attention" in stage.train:
                save_atomic({n: p for n, p in models.unet.state_dict().items() if ".attn2." in n},
                            out / f"attn2_{name}.safetensors")
            if accelerator.is_main_process and "embedding" in stage.train:
                save_atomic({cfg.data.placeholder: concept.row}, out / "learned_embeds.safetensors")
            save_checkpoint(name, stage.steps, None, done=True)
            fault_point(f"{name}:end")
    reporter.close()

    if accelerator.is_main_process:
        save_final(cfg, pipe, concept, out)
        if not cfg.runtime.keep_resume_state:
            shutil.rmtree(checkpointer.dir, ignore_errors=True)
        mark_finished(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def main(argv=None):
    from attndreambooth.preflight import plan_text, preflight
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            list_images(cfg.data)
            print(to_yaml(cfg))
            print(plan_text(cfg))
            return None
        state, paths = preflight(cfg)  # data, tokens, run folder, disk: before any weights load
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    if state == "finished":
        log.info("%s is a finished run: nothing to do (resume=false starts it over)", cfg.output_dir)
        return Path(cfg.output_dir)
    try:
        return train(cfg, state, paths)
    except (NonFiniteLoss, ConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
