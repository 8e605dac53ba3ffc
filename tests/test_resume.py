"""Never lose a run: kill -9 anywhere and rerun gives the same weights, bit for bit; a NaN stops the run
with its last checkpoint; a finished or different run in the folder is never overwritten."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from attndreambooth.checkpoint import Checkpointer
from conftest import ROOT

STEPS = {"stages.stage1.steps": 6, "stages.stage2.steps": 6, "stages.stage3.steps": 6}


def train(out, faults=(), **overrides):
    """The trainer in its own process, as a user runs it (faults, e.g. ["--kill=stage1:3"], go through
    tests/fault_runner.py's hooks); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    args = {"output_dir": out, "runtime.checkpoint_every_steps": 2, "runtime.tensorboard": "false", **STEPS, **overrides}
    cmd = [sys.executable, str(ROOT / "tests/fault_runner.py"), *faults, "--", "--config", str(ROOT / "configs/tiny.yaml")]
    return subprocess.run(cmd + [f"{k}={v}" for k, v in args.items()], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def final_tensors(out):
    files = [out / "learned_embeds.safetensors", out / "attn2_stage2.safetensors",
             *sorted((out / "pipeline").glob("*/*.safetensors"))]
    return {f"{f.parent.name}/{f.name}/{k}": v for f in files for k, v in load_file(f).items()}


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert train(out).returncode == 0
    return out


@pytest.mark.parametrize("kill", ["stage1:3", "stage1:end", "stage3:5", "checkpoint#5"])
def test_kill_and_rerun_gives_identical_weights(baseline, tmp_path, kill):
    out = tmp_path / "run"
    killed = train(out, [f"--kill={kill}"])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "finished.json").exists()
    resumed = train(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    want, got = final_tensors(baseline), final_tensors(out)
    assert want.keys() == got.keys()
    assert [k for k in want if not (want[k] == got[k]).all()] == []  # bitwise
    assert metrics(out) == metrics(baseline)  # steps after the last checkpoint were redone, not duplicated
    assert not (out / "resume").exists()  # resume state deleted once finished (runtime.keep_resume_state)


def test_nan_stops_with_message_and_last_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    failed = train(out, ["--nan=stage2:3"])
    assert failed.returncode == 1
    assert "stage2 step 3: the loss is not finite" in failed.stderr
    assert "stages.stage2.lr=1e-05" in failed.stderr  # how to resume
    _, tensors, meta = Checkpointer(out, 2).load_latest()
    assert (meta["stage"], meta["step"], meta["done"]) == ("stage2", 2, False)
    assert "weights.concept.row" in tensors and any(".attn2." in k for k in tensors) and meta["optimizer"]["state"]
    resumed = train(out, **{"stages.stage2.lr": 1e-5})  # the way out: a lower lr is an allowed change
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming with stages.stage2.lr changed" in resumed.stdout + resumed.stderr


def test_finished_run_is_left_alone_and_other_config_refused(baseline, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in baseline.rglob("*")}
    again = train(baseline)
    assert again.returncode == 0 and "finished run: nothing to do" in again.stdout + again.stderr
    other = train(baseline, **{"stages.stage3.steps": 7, "data.resolution": 128})
    assert other.returncode == 1
    assert "stages.stage3.steps: 6 in the run, 7 now" in other.stderr and "data.resolution: 64" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in baseline.rglob("*")} == before  # nothing touched


def test_resume_false_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "config.yaml").write_text("output_dir: x\n")
    (out / "notes.txt").write_text("mine")
    fresh = train(out, resume="false", **{"stages.stage1.steps": 1, "stages.stage2.steps": 1, "stages.stage3.steps": 1})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert (out / "finished.json").exists()
