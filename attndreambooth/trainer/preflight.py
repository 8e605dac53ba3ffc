"""Everything checked before any weights load: data, tokens, the run folder, the disk, the plan."""
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from attndreambooth.config.loading import to_yaml
from attndreambooth.config.plan import DTYPES, UNET_PARTS, Plan
from attndreambooth.config.schema import ConfigError
from attndreambooth.families.source import meta_models, model_source
from attndreambooth.trainer.checkpoint import size_text
from attndreambooth.trainer.concept import is_known_word
from attndreambooth.trainer.data import fingerprint, fingerprint_changes, list_images
from attndreambooth.trainer.lora import adapter_part, lora_parameter_count
from attndreambooth.trainer.parts import regularised_layers

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
IMAGES_FILE = "instance_images.json"  # the run's photos: name -> [bytes, sha256]
# Keys that may differ when a run is resumed: they change how it is logged or checkpointed, or are the
# way out of a numerical fault (a lower lr, clipping), or where the folder now is (moved or copied runs
# resume); everything else must match the run's config.yaml.
RESUMABLE_CHANGES = ("output_dir", "resume", "validation.", "runtime.log_every_steps", "runtime.tensorboard",
                     "runtime.checkpoint_every_steps", "runtime.keep_checkpoints", "runtime.keep_resume_state",
                     "runtime.max_grad_norm", "runtime.pipeline_dtype", "runtime.save_merged_pipeline")


def parameter_sizes(cfg, layout=None, plan=None):
    """Parameter counts: [V]'s row(s), the cross-attention layers, U-Net, text encoder(s), whole pipeline, each
    LoRA stage's adapter."""
    m = layout or meta_models(cfg)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    per_rank = {part: lora_parameter_count(m.unet, part, m.family) for part in UNET_PARTS}
    lora = {s.name: per_rank[adapter_part(s.config)] * s.config.lora_rank for s in plan or Plan(cfg.stages) if s.lora}
    text = sum(count(t) for t in m.text_encoders)
    cross = sum(p.numel() for n, p in m.unet.named_parameters() if m.family.is_cross_attention(n))
    return m.source, dict(embedding=sum(t.config.hidden_size for t in m.text_encoders), unet=count(m.unet),
                          text=text, cross_attention=cross, pipeline=count(m.unet) + text + count(m.vae), lora=lora,
                          lora_per_rank=per_rank)


def memory_sizes(cfg, layout=None, plan=None):
    """parameter_sizes plus the U-Net's activations per sample at data.resolution (the memory estimate)."""
    from attndreambooth.trainer.memory import activation_elements
    layout = layout or meta_models(cfg)
    source, sizes = parameter_sizes(cfg, layout, plan)
    sizes["activations"] = activation_elements(layout.unet, cfg.data.resolution, layout.family)
    return source, sizes


def fit_memory(cfg):
    """Resolve a card preset (runtime.memory=12gb|16gb|24gb) for this model, then check the config again."""
    import importlib.util

    from attndreambooth.config.checks import validate
    from attndreambooth.config.schema import CARD_PRESETS
    from attndreambooth.trainer.memory import fit_card
    if cfg.runtime.memory in CARD_PRESETS:
        _, sizes = memory_sizes(cfg)
        savers, peaks = fit_card(cfg, sizes, importlib.util.find_spec("bitsandbytes") is not None)
        log.info("runtime.memory=%s: %s (estimated peak %.1f GiB)", cfg.runtime.memory,
                 ", ".join(k for k, v in vars(savers).items() if v) or "no memory savers", max(peaks.values()))
        validate(cfg)
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
    """The stages with their trainable parameter counts and estimated peak GPU memory, for --dry-run."""
    from attndreambooth.trainer.memory import current_savers, stage_peaks
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
                         f"batch {s.batch_size}, reg mean/var weight {s.reg_mean_weight:g}/{s.reg_var_weight:g}, "
                         f"peak ~{peaks[name]:.1f} GiB")
        else:
            lines.append(f"  {name}: skipped")
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


def concept_position(tokenizer, template, placeholder):
    """Token position of "[V]" when `{}` of `template` is filled with it (start token included)."""
    before = template.split("{}")[0]
    return len(tokenizer(before).input_ids) - 1  # the end token is not counted; [V] follows `before`


def run_folder_state(cfg):
    """'new', 'replace' (resume=false over an earlier run), 'resume' or 'finished' for cfg.output_dir, without
    touching it; refuses a folder that is not this run's."""
    out = Path(cfg.output_dir)  # that it can be written in is checked with the config (config_checks.folder_problem)
    if not out.is_dir() or not [p for p in out.iterdir() if p.name not in (LOCK_NAME, IMAGES_FILE)]:
        return "new"
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"output_dir {out} holds files that are not a run of this trainer; choose a new "
                          "output_dir (nothing in it is touched)")
    if not cfg.resume:
        return "replace"
    try:
        old = yaml.safe_load((out / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"output_dir {out}: its config.yaml cannot be read ({e}); use a new output_dir or "
                          "resume=false") from None
    changed = config_changes(old if isinstance(old, dict) else {}, yaml.safe_load(to_yaml(cfg)))
    refused = [c for c in changed if not c[0].startswith(RESUMABLE_CHANGES) and not c[0].endswith(".lr")]
    if refused:
        lines = "\n".join(f"  {key}: {old!r} in the run, {new!r} now" for key, old, new in refused)
        raise ConfigError(f"output_dir {out} holds a run with another config:\n{lines}\n"
                          "Use a new output_dir, or resume=false to move the earlier run aside and start over.")
    for key, old, new in changed:
        if key != "output_dir":
            log.warning("resuming with %s changed: %r -> %r", key, old, new)
    return "finished" if (out / "finished.json").is_file() else "resume"


def hold_folder(out, option="output_dir", holder="a running training"):
    """An exclusive OS lock on out/.lock for as long as this process lives (the kernel drops it when the
    process dies, so a killed run never blocks); refuses a folder that a live process holds (a training's run
    folder; a sweep's --out)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        who = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{option} {out} is in use by {holder} ({who}); wait for it to end, or choose "
                          f"another {option}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def config_changes(old, new, prefix=""):
    """(dotted key, old, new) for every leaf that differs between two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b:
            changes.append((name, a, b))
    return changes


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
    """The checks that need no weights and write nothing (also --dry-run's): images, model path, tokens, the
    regularised layers. Returns the images and the model's layout on the meta device. download=False skips
    the token check for a hub id (it would fetch the tokenizer)."""
    paths = list_images(cfg.data)
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
    layout = meta_models(cfg)  # built once for the checks below
    if cfg.reg.enabled:  # the layer selection against the model's layout, before weights load
        regularised_layers(layout.family, layout.unet, cfg.reg.map_sizes, cfg.data.resolution)
    return paths, layout


def preflight(cfg, plan):
    """All checks that need no weights, then the run folder claimed (locked; for resume=false the earlier
    run moved aside, only now that everything else passed). Returns the folder's state ('new', 'resume',
    'finished'), the checked instance images and the lock (keep it for the process's life)."""
    paths, layout = check_inputs(cfg)
    check_world(plan)
    state = run_folder_state(cfg)
    if state == "resume":
        check_same_images(cfg, paths)
        check_checkpoint_fits(cfg, plan)
    if state != "finished":
        check_disk(cfg, plan, layout)
    if state == "finished":  # nothing will be written
        return state, paths, None
    if int(os.environ.get("RANK", 0)) != 0:  # under a launcher, rank 0 claims the folder for all
        return ("new" if state == "replace" else state), paths, None
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
    return state, paths, lock


def world_size():
    """How many processes train (the launcher's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_world(plan):
    """Every stage's batch splits evenly over the processes (each takes batch_size / processes)."""
    world = world_size()
    for s in plan:
        if s.config.batch_size % world:
            raise ConfigError(f"config key 'stages.{s.name}.batch_size': {s.config.batch_size} does not split over "
                              f"the {world} processes launched; use a multiple of {world}, or launch a number of "
                              "processes that divides it")


def check_checkpoint_fits(cfg, plan):
    """The newest checkpoint's position must be one the plan can continue from: a config (e.g. a hand-edited
    RUN/config.yaml) whose stage has fewer steps than the checkpoint already did, or another step count for a
    stage the checkpoint finished, or without the checkpoint's stage, would log one schedule and keep another."""
    for state in sorted((Path(cfg.output_dir) / "resume").glob("ckpt-*/state.json"), reverse=True):
        try:
            meta = json.loads(state.read_text())
            name, step, done, global_step = meta["stage"], int(meta["step"]), bool(meta["done"]), int(meta["global_step"])
        except (ValueError, KeyError, TypeError):
            continue  # a damaged one: the run skips it too (checkpoint.load_latest)
        if name not in plan.names:
            raise ConfigError(f"the run in {cfg.output_dir} was checkpointed in stage {name!r}, which this config "
                              f"does not run (it runs {', '.join(plan.names)}); use the run's own config, or a new "
                              "output_dir (or resume=false) for this one")
        steps = plan[name].config.steps
        if step > steps or (done and step != steps):
            want = f"back to {step}" if done else f"to {step} or more"
            raise ConfigError(f"config key 'stages.{name}.steps': {steps}, but the run in {cfg.output_dir} has "
                              f"already {'finished' if done else 'done'} {step} steps of {name}; set it {want} to "
                              "resume, or use a new output_dir (or resume=false) to start over")
        before = [s for s in plan.stages[:plan.names.index(name)]]
        if sum(s.config.steps for s in before) + step != global_step:  # an earlier stage's count changed
            raise ConfigError(f"the run in {cfg.output_dir} did {global_step - step} steps before {name}, but this "
                              f"config's earlier stages have {' + '.join(f'{s.name} {s.config.steps}' for s in before)}; "
                              "set their steps back to what the run did to resume, or use a new output_dir (or "
                              "resume=false) to start over")
        return


def check_same_images(cfg, paths):
    """A run resumes on the images it started with: the data order and the view pool in its checkpoint are
    theirs (photos added would never be seen, removed ones indexed past the end)."""
    recorded = Path(cfg.output_dir) / IMAGES_FILE
    if recorded.is_file():
        changes = fingerprint_changes(json.loads(recorded.read_text()), fingerprint(paths))
        if changes:
            raise ConfigError(f"data.instance_dir {cfg.data.instance_dir} has changed since the run in "
                              f"{cfg.output_dir} started ({changes}); put the photos back as they were to resume, "
                              "or use a new output_dir (or resume=false) to train on the new set")


def mark_finished(out):
    (Path(out) / "finished.json").write_text(json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
