"""Resume state on disk: atomic, bounded checkpoints of safetensors + JSON (no pickle anywhere).

A checkpoint is what `RunState.state_dict()` returns, a dict of tensors and a dict of JSON
values. It is written to a temporary folder and renamed, so a kill during a write leaves the
previous one intact; one that cannot be read (a damaged disk, a hand-edited file) is skipped for
the newest one that can.
"""
import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint can be read, or none can be written; the message says what to do."""


def size_text(n):
    """A byte count in words: MB below 1 GB."""
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


def free_space(folder):
    """Free space of the disk holding `folder`, in words."""
    return size_text(shutil.disk_usage(next(p for p in [Path(folder), *Path(folder).parents] if p.exists())).free)


def flatten_optimizer(state_dict):
    """An optimizer state dict as (tensors "optim.<param>.<key>", JSON-able rest)."""
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, entry in state_dict["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(idx)][key] = value
    return tensors, meta


def unflatten_optimizer(tensors, meta):
    state = {int(i): dict(entry) for i, entry in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    """Writes and finds checkpoints in output_dir/resume/; keeps the last `keep`. `faults.at("checkpoint")`
    is called between the tensors and the JSON of a write (tests kill the process there)."""

    def __init__(self, out, keep, faults=None):
        self.dir, self.keep, self.faults = Path(out) / "resume", keep, faults
        self.last = None  # (stage, step) of the newest checkpoint written or loaded

    def folders(self):
        """Complete checkpoint folders, newest first (the name carries the global step)."""
        return sorted((p for p in self.dir.glob("ckpt-*") if p.is_dir()), reverse=True)

    def save(self, tensors, meta):
        """Write one checkpoint atomically; `meta` has at least stage, step and global_step."""
        start = time.perf_counter()
        final = self.dir / f"ckpt-{meta['global_step']:06d}"
        tmp = self.dir / f".tmp-{final.name}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
            if self.faults is not None:
                self.faults.at("checkpoint")
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = f"the previous checkpoint ({self.last[0]} step {self.last[1]}) is kept" if self.last else \
                "no earlier checkpoint exists"
            raise CheckpointError(f"the disk is full: a checkpoint could not be written in {self.dir} "
                                  f"({free_space(self.dir)} free); {kept}. Free space and run the same command "
                                  "to resume, or lower runtime.keep_checkpoints") from None
        for old in self.folders()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        self.last = (meta["stage"], meta["step"])
        size = (final / "state.safetensors").stat().st_size
        log.info("checkpoint %s (%s step %d): %.1f MB in %.2f s", final.name, meta["stage"], meta["step"],
                 size / 1e6, time.perf_counter() - start)
        return final

    @staticmethod
    def load(path):
        """(tensors, meta) of a checkpoint folder; raises on a missing or damaged file."""
        meta = json.loads((Path(path) / "state.json").read_text())
        if not isinstance(meta, dict) or not {"stage", "step", "global_step"} <= set(meta):
            raise ValueError("state.json is not a checkpoint's")
        return load_file(Path(path) / "state.safetensors"), meta

    def load_latest(self):
        """(path, tensors, meta) of the newest checkpoint that can be read, or None if there is none.
        Damaged ones are skipped with a warning; if none can be read, CheckpointError says so."""
        folders = self.folders()
        for path in folders:
            try:
                tensors, meta = self.load(path)
            except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # JSONDecodeError is a ValueError
                log.warning("checkpoint %s cannot be read (%s: %s); trying an older one", path, type(e).__name__, e)
                continue
            self.last = (meta["stage"], meta["step"])
            return path, tensors, meta
        if folders:
            raise CheckpointError(f"none of the {len(folders)} checkpoints in {self.dir} can be read (see the warnings "
                                  f"above); move {self.dir} away to train this run from the start, or set "
                                  "resume=false to start over in a fresh folder")
        return None

    def clean_partial(self):
        """Remove folders left by a write that was killed."""
        for tmp in self.dir.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
