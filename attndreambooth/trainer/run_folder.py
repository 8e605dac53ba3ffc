"""The run folder: whether it holds a new, resumable, finished or foreign run (and whether a resume fits its
checkpoint and its photos), the OS lock that keeps two trainings out of one folder, and what a finished run
leaves."""
import dataclasses
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml

from attndreambooth.config.checks import RUN_LOCK
from attndreambooth.config.loading import to_yaml
from attndreambooth.config.schema import ConfigError
from attndreambooth.trainer.data import fingerprint, fingerprint_changes

log = logging.getLogger(__name__)
IMAGES_FILE = "instance_images.json"  # the run's photos: name -> [bytes, sha256]
# Keys that may differ when a run is resumed: they change how it is logged or checkpointed, or are the
# way out of a numerical fault (a lower lr, clipping), or where the folder now is (moved or copied runs
# resume); everything else defines the training and must match what the run trained under.
# The compile switches (runtime.compile, .compile_cache), the CUDA graph and gradient checkpointing (with the
# memory preset that may switch it) change how a step runs, not what it computes.
RESUMABLE_CHANGES = ("output_dir", "resume", "validation.", "runtime.log_every_steps", "runtime.tensorboard",
                     "runtime.report_to", "runtime.checkpoint_every_steps", "runtime.keep_checkpoints",
                     "runtime.keep_resume_state", "runtime.max_grad_norm", "runtime.pipeline_dtype",
                     "runtime.save_merged_pipeline", "runtime.compile", "runtime.cuda_graph",
                     "runtime.gradient_checkpointing", "runtime.memory")
FINISHED_FILE = "finished.json"


def run_folder_state(cfg):
    """('new', 'replace' (resume=false over an earlier run), 'resume' or 'finished', the allowed changes of
    config keys as (key, in the run, now)) for cfg.output_dir, without touching it; refuses a folder that is
    not this run's."""
    out = Path(cfg.output_dir)  # that it can be written in is checked with the config (config_checks.folder_problem)
    if not out.is_dir() or not [p for p in out.iterdir() if p.name not in (RUN_LOCK, IMAGES_FILE)]:
        return "new", []
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"output_dir {out} holds files that are not a run of this trainer; choose a new "
                          "output_dir (nothing in it is touched)")
    if not cfg.resume:
        return "replace", []
    old = recorded_config(out)
    changed = config_changes(upgraded(old if isinstance(old, dict) else {}), yaml.safe_load(to_yaml(cfg)))
    refused = [c for c in changed if not c[0].startswith(RESUMABLE_CHANGES) and not c[0].endswith(".lr")]
    if refused:
        lines = "\n".join(f"  {key}: {old!r} in the run, {new!r} now" for key, old, new in refused)
        raise ConfigError(f"output_dir {out} holds a run with another config:\n{lines}\n"
                          "Use a new output_dir, or resume=false to move the earlier run aside and start over.")
    if (out / FINISHED_FILE).is_file():
        return "finished", changed  # what each change means for a finished run: trainer/finished.py
    for key, old, new in changed:
        if key != "output_dir":
            log.warning("resuming with %s changed: %r -> %r", key, old, new)
    return "resume", changed


def recorded_config(out):
    """The config the run in `out` trained under, as the training itself recorded it: in its finished.json
    when it finished, else in its newest readable checkpoint (config.yaml may have been edited by hand since).
    A run written before records were kept falls back to its config.yaml."""
    records = [out / FINISHED_FILE] if (out / FINISHED_FILE).is_file() else sorted(
        (out / "resume").glob("ckpt-*/state.json"), reverse=True)
    for path in records:
        try:
            config = json.loads(path.read_text()).get("config")
        except (ValueError, AttributeError, OSError):
            continue  # a damaged checkpoint: the run skips it too (checkpoint.load_latest)
        if isinstance(config, dict):
            return config
        break  # the newest readable record has none: an older version's run
    try:
        return yaml.safe_load((out / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"output_dir {out}: its config.yaml cannot be read ({e}); use a new output_dir or "
                          "resume=false") from None


def hold_folder(out, option="output_dir", holder="a running training"):
    """An exclusive OS lock on out/.lock for as long as this process lives (the kernel drops it when the
    process dies, so a killed run never blocks); refuses a folder that a live process holds (a training's run
    folder; a sweep's --out)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / RUN_LOCK, "a+")
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


def upgraded(record):
    """A run's config.yaml as this version writes it: keys added since it was written take their defaults
    (a new option's default keeps the old behaviour) and `runtime.compile`, once true/false, is full/off."""
    from omegaconf import MISSING

    from attndreambooth.config.schema import Config, StageConfig

    def fill(into, defaults):
        for key, value in defaults.items():
            if key not in into:
                into[key] = value
            elif isinstance(value, dict) and isinstance(into[key], dict) and key != "stages":
                fill(into[key], value)
        return into

    record = fill(record, yaml.safe_load(to_yaml(Config())))
    stage_defaults = {f.name: f.default for f in dataclasses.fields(StageConfig) if f.default is not MISSING}
    stage_defaults["lora_rank"] = 0  # what a resolved config writes for full weights
    for stage in (record.get("stages") or {}).values():
        if isinstance(stage, dict):
            fill(stage, stage_defaults)
    runtime = record.get("runtime")
    if isinstance(runtime, dict) and isinstance(runtime.get("compile"), bool):
        runtime["compile"] = "full" if runtime["compile"] else "off"
    return record


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


def world_size():
    """How many processes train (the launcher's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_world(plan, cuda_graph=False):
    """Every stage's batch splits evenly over the processes (each takes batch_size / processes); a captured
    step runs in one process (DDP's all-reduce inside a CUDA graph is not built)."""
    world = world_size()
    if cuda_graph and world > 1:
        raise ConfigError(f"config key 'runtime.cuda_graph': the step is captured in one process, and {world} "
                          "were launched; launch one, or set runtime.cuda_graph=false")
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


def missing_outputs(cfg, plan):
    """The final artefacts a finished run in cfg.output_dir should hold but does not (e.g. pipeline/ deleted)."""
    from attndreambooth.config.plan import LORA_FILE
    out = Path(cfg.output_dir)
    want = ["learned_embeds.safetensors"] + ([LORA_FILE] if plan.lora else [])
    if not plan.lora or cfg.runtime.save_merged_pipeline:
        want.append("pipeline/model_index.json")
    return [w for w in want if not (out / w).is_file()]


def mark_finished(out, config):
    """`config`: the resolved config as a dict, what the run trained under (see recorded_config)."""
    record = {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config}
    (Path(out) / FINISHED_FILE).write_text(json.dumps(record, indent=1))
