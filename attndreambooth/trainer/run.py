"""One AttnDreamBooth run: load, train every planned stage in order (continuing from the newest
checkpoint), write the run folder. `run(cfg, state, paths)` is what train_attndreambooth.py calls."""
import contextlib
import errno
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from tqdm.contrib.logging import logging_redirect_tqdm

from attndreambooth.config.loading import to_yaml
from attndreambooth.config.plan import DTYPES, KOHYA_LORA_FILE, LORA_FILE, UNET_PARTS
from attndreambooth.config.schema import ConfigError
from attndreambooth.trainer.checkpoint import CheckpointError, Checkpointer, free_space

log = logging.getLogger("attndreambooth")


class Interrupted(RuntimeError):
    """Ctrl-C: the message says where the run stopped and how to continue."""


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


def prepare(cfg, plan, accelerator, paths):
    """Load the model, add [V], encode the view pool once, install the hook; returns (pipe, models, batches)."""
    from attndreambooth.families.source import load_pipeline
    from attndreambooth.trainer.concept import add_concept_token, encode_prompt
    from attndreambooth.trainer.data import LatentBatches, encode_view_pool
    from attndreambooth.trainer.lora import add_adapters
    from attndreambooth.trainer.map_sizes import latent_side, regularised_layers
    from attndreambooth.trainer.prior import attach_prior
    from attndreambooth.trainer.models import Models

    pipe, family = load_pipeline(cfg.model)
    family = family.configured(cfg.model)
    vae, unet = pipe.vae, family.denoiser(pipe)
    text_encoders, tokenizers = family.text_encoders(pipe), family.tokenizers(pipe)
    if cfg.runtime.half_frozen_weights:  # what never trains as a whole: the text encoders ([V] is its own fp32
        half = DTYPES[cfg.runtime.mixed_precision]  # row), and the U-Net of a run that trains only adapters
        for encoder in text_encoders:
            encoder.to(half)
        if plan.lora or not plan.trained_parts() & UNET_PARTS:
            unet.to(half)
    d = cfg.data
    prompt = d.prompt_template.format(placeholder=d.placeholder, category=d.category)
    input_ids, positions = [], []
    lengths = family.token_lengths(tokenizers)  # each as the family's pipeline pads it
    for tokenizer, encoder, length in zip(tokenizers, text_encoders, lengths):  # [V]: a row in each, own vocabulary
        token_id, category_ids = add_concept_token(tokenizer, encoder, d.placeholder, d.category, d.init_token)
        ids, v_pos, cat_pos = encode_prompt(tokenizer, prompt, token_id, category_ids, length)
        input_ids.append(ids)
        positions.append([v_pos, cat_pos])
    v_pos, cat_pos = family.map_positions(positions)
    log.info("training prompt %r: [V] at token %d, category at token %d (of the tokens the maps are read at)",
             prompt, v_pos, cat_pos)

    if cfg.runtime.quantize_base:  # after [V]'s row is its own parameter, before LoRA wraps the layers
        from attndreambooth.trainer.quantise import quantise_frozen
        layers = quantise_frozen([unet, *text_encoders], cfg.runtime.quantize_base)
        log.info("runtime.quantize_base=%s: %d frozen linear layers stored in %s", cfg.runtime.quantize_base, layers,
                 cfg.runtime.quantize_base)
    adapters = add_adapters(unet, plan, family)
    if adapters:
        log.info("LoRA adapters %s on the U-Net", ", ".join(adapters))
    device = accelerator.device
    vae.to(device).requires_grad_(False)
    for encoder in text_encoders:
        encoder.to(device)
    unet.to(device)
    if cfg.runtime.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.runtime.channels_last:
        unet.to(memory_format=torch.channels_last)
    mean, std, geometry = encode_view_pool(vae, paths, cfg.data, cfg.runtime.seed, device)
    log.info("encoded %d views of %d images once (%d each)", mean.shape[0], len(paths), cfg.data.views_per_image)
    vae.to("cpu")  # the VAE leaves the training device
    seed = cfg.runtime.seed * 1000 + accelerator.process_index
    gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(device).manual_seed(seed) if device.type != "cpu" else None  # a CPU: one generator
    batches = LatentBatches(mean, std, len(paths), vae.config.scaling_factor, gen, geometry, device_gen,
                            family.latent_shift(vae.config))
    prior_cond = None
    if cfg.prior.enabled:  # the class images, made by the model as loaded (before any stage trains it)
        prior_cond = attach_prior(cfg, pipe, family, text_encoders, tokenizers, batches, accelerator)
    capture = None  # without the regulariser every layer keeps the stock (SDPA) processor
    if cfg.reg.enabled:
        layers = regularised_layers(family, unet, cfg.reg, latent_side(vae.config, cfg.data.resolution))
        capture = family.capture(unet, [v_pos, cat_pos], layers, cfg.reg, cfg.model.cross_attention_layers,
                                 input_ids[-1].shape[1])
        log.info("Eq. 2 over %d of the denoiser's %d cross-attention layers", len(layers),
                 len(family.cross_attention_layers(unet)))
    models = Models(family, unet, text_encoders, family.training_scheduler(pipe.scheduler.config), capture,
                    [ids.to(device) for ids in input_ids], prior_cond=prior_cond)
    return pipe, models, batches


def embedding_files(cfg, models):
    """{file name: tensors} of the learned embedding, in the family's formats (diffusers' and A1111 / ComfyUI's)."""
    rows = [encoder.get_input_embeddings().row for encoder in models.text_encoders]
    return models.family.embedding_files(rows, cfg.data.placeholder)


def save_final(cfg, plan, pipe, models, out):
    """The slim artefacts: the embedding in two formats, the LoRA file of a LoRA run, and the complete
    pipeline (for a LoRA run only with runtime.save_merged_pipeline), each written atomically."""
    from attndreambooth.families.source import replace_pipeline
    from attndreambooth.trainer.concept import bake_concept
    from attndreambooth.trainer.lora import merge_adapters, save_lora
    for name, tensors in embedding_files(cfg, models).items():
        save_atomic(tensors, out / name)
    if plan.lora:
        save_lora(models.unet, plan.names, out / LORA_FILE, models.family, out / KOHYA_LORA_FILE)
        kohya = f" and {out / KOHYA_LORA_FILE} (for ComfyUI, AUTOMATIC1111 and kohya)" * (out / KOHYA_LORA_FILE).is_file()
        log.info("saved %s (load with pipe.load_lora_weights(%r) and the embedding)%s", out / LORA_FILE, str(out), kohya)
        if not cfg.runtime.save_merged_pipeline:
            return
        merge_adapters(models.unet)
    for encoder in models.text_encoders:
        bake_concept(encoder)  # in place: the pipeline holds the same modules
    replace_pipeline(pipe, out / "pipeline", DTYPES[cfg.runtime.pipeline_dtype])
    log.info("saved %s (load with %s.from_pretrained)", out / "pipeline", type(pipe).__name__)


def run(cfg, plan, state, paths, faults=None):
    """Run every planned stage in order on the instance images `paths` (continuing from the newest good
    checkpoint when `state` is 'resume') and write the run folder; returns the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from attndreambooth.trainer.compiling import compile_counts, compile_unet, use_cache
    from attndreambooth.inference.sampling import validation_grid
    from attndreambooth.trainer.lora import save_lora
    from attndreambooth.trainer.run_folder import mark_finished, world_size
    from attndreambooth.trainer.signals import Stopped
    from attndreambooth.trainer.state import RunState
    from attndreambooth.trainer.trackers import hyperparameters, log_grid, log_with, start_trackers, trackers_in_use
    from attndreambooth.trainer.method import FaultInjection, train_stage
    from attndreambooth.trainer.reporting import Reporter

    faults, out = faults or FaultInjection(), Path(cfg.output_dir)
    world = world_size()
    trackers = trackers_in_use(cfg)
    # accelerate runs several processes without GPUs only when told `cpu` (gloo backend)
    accelerator = Accelerator(mixed_precision=cfg.runtime.mixed_precision,
                              cpu=world > 1 and not torch.cuda.is_available(),
                              log_with=log_with(trackers, out) if trackers else None, project_dir=str(out))
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched {world} processes but accelerate set up {accelerator.num_processes}; "
                           "each would train alone: check the launcher (accelerate launch / torchrun)")
    if cfg.runtime.mixed_precision == "fp16" and accelerator.scaler is None:
        raise ConfigError("config key 'runtime.mixed_precision': fp16 needs a gradient scaler, which accelerate "
                          "gives on CUDA only (fp32 weights with unscaled fp16 gradients underflow); use bf16")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(f"# trained by {world} process{'es' * (world > 1)}\n" + to_yaml(cfg))
    accelerator.wait_for_everyone()
    setup_logging(out, accelerator.is_main_process)
    log.info("%d process%s train%s", world, "es" * (world > 1), ", each on its share of every batch" * (world > 1))
    if trackers:
        start_trackers(accelerator, trackers, hyperparameters(yaml.safe_load(to_yaml(cfg))), out.name)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.runtime.allow_tf32
    set_seed(cfg.runtime.seed)

    pipe, models, batches = prepare(cfg, plan, accelerator, paths)
    device, capture = accelerator.device, models.capture
    components = models.family.components(pipe)

    def validate(name, step, global_step):
        if accelerator.is_main_process:  # eager and with the stock processors: no maps, no recompilation
            with capture.paused() if capture else contextlib.nullcontext(), torch.compiler.set_stance("force_eager"):
                grid = validation_grid(models.family, components, f"{cfg.data.placeholder} {cfg.data.category}",
                                       cfg.validation, device, accelerator.autocast(), cfg.data.resolution)
            (out / "validation").mkdir(exist_ok=True)
            grid.save(out / "validation" / f"{name}_{step:05d}.png")
            log_grid(accelerator, trackers, f"validation/{name}", grid, global_step)
        accelerator.wait_for_everyone()

    run_state = RunState(models, batches, plan)
    checkpointer = Checkpointer(out, cfg.runtime.keep_checkpoints, faults)
    latest = checkpointer.load_latest() if state == "resume" else None
    if latest is not None:
        path, tensors, meta = latest
        run_state.load_state_dict(tensors, meta, accelerator.process_index)
        log.info("resuming from %s: %s step %d", path, meta["stage"], meta["step"])
    if accelerator.is_main_process:
        checkpointer.clean_partial()
        lines = (out / "metrics.jsonl").read_text().splitlines(True) if (out / "metrics.jsonl").exists() else []
        (out / "metrics.jsonl").write_text("".join(lines[:run_state.global_step]))  # later steps are redone
    reporter = Reporter(out, accelerator, cfg, validate)
    reporter.global_step = run_state.global_step

    training = yaml.safe_load(to_yaml(cfg))  # recorded with every checkpoint: a resume is compared with it

    def save_checkpoint(s):
        tensors, meta = s.state_dict(gather_object([batches.state_dict()]))  # every rank's data stream
        meta["config"] = training
        if accelerator.is_main_process:
            checkpointer.save(tensors, meta)
        accelerator.wait_for_everyone()

    try:
        # log lines go through tqdm while bars run: they never land on a bar's line, in a terminal or a file
        with capture or contextlib.nullcontext(), logging_redirect_tqdm(loggers=[logging.getLogger()]):
            if cfg.runtime.compile != "off":
                log.info("runtime.compile=%s: compiled graphs are cached in %s%s", cfg.runtime.compile,
                         use_cache(cfg.runtime.compile_cache, device),
                         " (on a CPU compiling usually costs more than it saves)" * (device.type == "cpu"))
                compile_unet(models.unet, cfg.runtime.compile)
            for planned in plan:
                name, stage = planned.name, planned.config
                if run_state.finished(name):
                    log.info("%s: already done", name)
                    continue
                seconds, peak = train_stage(planned, models, batches, accelerator, cfg, reporter, run_state,
                                            save_checkpoint, faults)
                log.info("%s done: %d steps in %.1f s, peak %s memory %.2f GiB", name, stage.steps, seconds,
                         "GPU" if device.type == "cuda" else "process", peak)
                if accelerator.is_main_process and planned.lora:  # the adapters so far (infer.py --stage)
                    save_lora(models.unet, [s.name for s in plan if s.number <= planned.number],
                              out / planned.saves[-1], models.family)
                elif accelerator.is_main_process and "cross_attention" in stage.train:
                    save_atomic(models.family.cross_attention_state(models.unet), out / f"attn2_{name}.safetensors")
                if accelerator.is_main_process and "embedding" in stage.train:
                    save_atomic(embedding_files(cfg, models)["learned_embeds.safetensors"],
                                out / "learned_embeds.safetensors")
                save_checkpoint(run_state)
                faults.at(f"{name}:end")
        reporter.close()
        if cfg.runtime.compile != "off":
            log.info("compilation: %(graphs)d graphs, %(breaks)d graph breaks, FX-graph cache %(cache_hits)d hits "
                     "and %(cache_misses)d misses", compile_counts())
        if accelerator.is_main_process:
            save_final(cfg, plan, pipe, models, out)
            mark_finished(out, training)  # before resume/ goes: a kill in between leaves a finished run, not a lost one
            faults.at("finished")
            if not cfg.runtime.keep_resume_state:
                shutil.rmtree(checkpointer.dir, ignore_errors=True)
    except Stopped as e:
        message = f"stopped by SIGTERM after {e}, with a checkpoint there; run the same command to resume"
        log.error(message)  # in train.log too: a cluster job's end is read there
        raise Interrupted(message) from None
    except KeyboardInterrupt:
        last = f"{checkpointer.last[0]} step {checkpointer.last[1]}" if checkpointer.last else "none yet"
        message = (f"interrupted in {run_state.stage} at step {run_state.step}; the last checkpoint is {last}; "
                   "run the same command to resume")
        log.error(message)
        raise Interrupted(message) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CheckpointError(f"the disk is full: writing in {out} failed ({free_space(out)} free). Free space and "
                              "run the same command to resume from the last checkpoint") from None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
