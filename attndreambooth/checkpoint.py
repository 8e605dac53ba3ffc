"""Resume state: atomic, bounded checkpoints of safetensors + JSON (no pickle anywhere).

A checkpoint holds what training has changed so far (the [V] row, the cross-attention or
whole U-Net weights), the optimizer state of the stage in progress, and the sampler's
random state and data order, so a resumed run continues bit for bit. It is written to a
temporary folder and renamed, so a kill during a write leaves the previous one intact.
"""
import json
import logging
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
_hits = Counter()


def fault_point(name):
    """Test hook: ATTNDB_KILL_AT="name" (or "name#k" for the k-th time) kills this process here with
    SIGKILL, as a pre-empted machine would; ATTNDB_NAN_AT="name" makes `inject_nan` return True."""
    _hits[name] += 1
    want = os.environ.get("ATTNDB_KILL_AT", "")
    if want in (name, f"{name}#{_hits[name]}"):
        os.kill(os.getpid(), signal.SIGKILL)


def inject_nan(name):
    return os.environ.get("ATTNDB_NAN_AT") == name


def _flatten_optimizer(state_dict):
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, entry in state_dict["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(idx)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors, meta):
    state = {int(i): dict(entry) for i, entry in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    """Writes and finds checkpoints in output_dir/resume/; keeps the last `keep`."""

    def __init__(self, out, keep):
        self.dir, self.keep = Path(out) / "resume", keep

    def latest(self):
        """The newest complete checkpoint folder, or None (half-written ones are ignored)."""
        done = [p for p in self.dir.glob("ckpt-*") if (p / "state.json").is_file()]
        return max(done, key=lambda p: json.loads((p / "state.json").read_text())["global_step"], default=None)

    def save(self, meta, weights, optimizer, samplers):
        """Write one checkpoint atomically; `meta` has stage, step, done, global_step; `samplers` is
        every process's (generator state, image order)."""
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"ckpt-{meta['global_step']:06d}"
        tmp = self.dir / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        opt_meta = None
        if optimizer is not None:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
            tensors.update(opt_tensors)
        for rank, (state, _) in enumerate(samplers):
            tensors[f"rng.sampler.{rank}"] = state
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / "state.safetensors")
        fault_point("checkpoint")
        (tmp / "state.json").write_text(json.dumps(dict(meta, optimizer=opt_meta, orders=[o for _, o in samplers]), indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(self.dir.glob("ckpt-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        size = (final / "state.safetensors").stat().st_size
        log.info("checkpoint %s (%s step %d): %.1f MB in %.2f s", final.name, meta["stage"], meta["step"],
                 size / 1e6, time.perf_counter() - start)
        return final

    @staticmethod
    def load(path):
        """(meta, weights, optimizer state dict or None, rng tensors) of a checkpoint folder."""
        meta = json.loads((Path(path) / "state.json").read_text())
        tensors = load_file(Path(path) / "state.safetensors")
        weights = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng."))}
        optimizer = _unflatten_optimizer(tensors, meta["optimizer"]) if meta["optimizer"] else None
        return meta, weights, optimizer, {k: v for k, v in tensors.items() if k.startswith("rng.")}

    def clean_partial(self):
        """Remove folders left by a write that was killed."""
        for tmp in self.dir.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
