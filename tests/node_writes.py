"""Helper for test_train.py, run under two torchrun "nodes" of one process each (so the second node's process
is RANK 1 with LOCAL_RANK 0, as on a second machine): the tiny run with checkpoints, each process recording
every file it creates, writes, renames or removes under the run folder in OUT/writes_rank<R>.json.
Writes are seen three ways: Python's audit events (open for writing, rename, mkdir, remove) and, for the
writers that open files outside Python, safetensors' and torch's save functions, wrapped before the trainer
imports them."""
import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
run = (out / "run").resolve()
writes = []
WRITE_EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}


def under_run(path):
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(run)
    except (TypeError, ValueError):  # a file descriptor, not a path
        return False


def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        writing = any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and under_run(path):
            writes.append(f"open {Path(os.fsdecode(path)).relative_to(run)}")
    elif event in WRITE_EVENTS and args and any(under_run(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        writes.append(f"{event} {os.fsdecode(args[0])}")


def recorded(name, save):
    def wrapper(obj, path, *a, **kw):
        if isinstance(path, (str, os.PathLike)) and under_run(path):
            writes.append(f"{name} {Path(path).resolve().relative_to(run)}")
        return save(obj, path, *a, **kw)
    return wrapper


safetensors.torch.save_file = recorded("save_file", safetensors.torch.save_file)
torch.save = recorded("torch.save", torch.save)
sys.addaudithook(audit)

import train_attndreambooth as T  # noqa: E402  (after the wrappers: the trainer's imports bind them)
from conftest import ROOT, tiny_overrides  # noqa: E402

try:
    T.main(["--config", str(ROOT / "configs/tiny.yaml")] + tiny_overrides(
        run, **{"runtime.checkpoint_every_steps": 2, "runtime.keep_resume_state": "true"}))
finally:
    (out / f"writes_rank{rank}.json").write_text(json.dumps(writes, indent=1))
