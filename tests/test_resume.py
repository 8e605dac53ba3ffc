"""Never lose a run: kill -9 anywhere and rerun gives the same weights, bit for bit; a NaN stops the run
with its last checkpoint; a finished or different run in the folder is never overwritten."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from attndreambooth.trainer.checkpoint import Checkpointer
import warm_runs
from conftest import ROOT

STEPS = {"stages.stage1.steps": 6, "stages.stage2.steps": 6, "stages.stage3.steps": 6}


def train(out, faults=(), **overrides):
    """The trainer in its own process, as a user runs it (faults, e.g. ["--kill=stage1:3"], go through
    tests/fault_runner.py's hooks; the process is forked from one with the imports done, tests/warm_runs.py);
    returns the CompletedProcess."""
    args = {"output_dir": out, "runtime.checkpoint_every_steps": 2, "runtime.tensorboard": "false", **STEPS, **overrides}
    return trainer([*faults, "--", "--config", str(ROOT / "configs/tiny.yaml"), *(f"{k}={v}" for k, v in args.items())])


def trainer(argv):
    return warm_runs.run(argv, dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT)))


def straight_and_killed(tmp_path, kills, **overrides):
    """The final tensors of an uninterrupted run and of one killed at each of `kills` and resumed by the same
    command (both in folders of the same name: final_tensors' keys carry it)."""
    runs = {}
    for name, points in (("straight", []), ("killed", kills)):
        out = runs[name] = tmp_path / name / "run"
        for kill in points:
            first = train(out, [f"--kill={kill}"], **overrides)
            assert first.returncode == -9 and not (out / "finished.json").exists()
        last = train(out, **overrides)
        assert last.returncode == 0 and ("resuming from" in last.stdout) == bool(points), last.stderr[-2000:]
    return final_tensors(runs["straight"]), final_tensors(runs["killed"])


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_finished_run_is_left_alone_and_other_config_refused(baseline, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in baseline.rglob("*")}
    again = train(baseline)
    assert again.returncode == 0 and "finished run: nothing to do" in again.stdout + again.stderr
    other = train(baseline, **{"stages.stage3.steps": 7, "data.resolution": 128})
    assert other.returncode == 1
    assert "stages.stage3.steps: 6 in the run, 7 now" in other.stderr and "data.resolution: 64" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in baseline.rglob("*")} == before  # nothing touched


@pytest.mark.slow
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


def same_as_baseline(baseline, out):
    want, got = final_tensors(baseline), final_tensors(out)
    return want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def fake_checkpoints(tmp_path):
    """Three small checkpoints (global steps 1, 2, 3) written by the Checkpointer itself."""
    import torch
    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        ckpt.save({"weights.w": torch.full((4,), float(step))}, dict(stage="stage1", step=step, global_step=step))
    return ckpt


@pytest.mark.parametrize("damage", ["json_garbage", "json_empty", "safetensors_truncated", "files_missing"])
def test_damaged_newest_checkpoint_is_skipped_for_an_older_one(tmp_path, caplog, damage):
    ckpt = fake_checkpoints(tmp_path)
    newest, middle, _ = ckpt.folders()
    if damage == "json_garbage":
        (newest / "state.json").write_text("{not json")
    elif damage == "json_empty":
        (newest / "state.json").write_text("")
    elif damage == "safetensors_truncated":
        data = (newest / "state.safetensors").read_bytes()
        (newest / "state.safetensors").write_bytes(data[:len(data) // 2])
    else:
        (newest / "state.safetensors").unlink()
    (middle / "state.json").write_text("[]")  # an older one damaged too: the oldest good one is used
    path, tensors, meta = ckpt.load_latest()
    assert meta["step"] == 1 and tensors["weights.w"][0].item() == 1.0
    assert f"checkpoint {newest} cannot be read" in caplog.text and f"checkpoint {middle} cannot be read" in caplog.text


def test_no_readable_checkpoint_says_so(tmp_path):
    from attndreambooth.trainer.checkpoint import CheckpointError
    ckpt = fake_checkpoints(tmp_path)
    for folder in ckpt.folders():
        (folder / "state.json").write_text("")
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints in .* can be read.*resume=false"):
        ckpt.load_latest()


@pytest.mark.slow
def test_damaged_checkpoint_in_a_real_run_resumes_from_the_previous(baseline, tmp_path):
    out = tmp_path / "run"
    assert train(out, ["--kill=stage3:5"]).returncode == -9
    newest = Checkpointer(out, 2).folders()[0]
    (newest / "state.safetensors").write_bytes(b"garbage")
    resumed = train(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "cannot be read" in resumed.stdout + resumed.stderr and "resuming from" in resumed.stdout
    assert same_as_baseline(baseline, out)


@pytest.mark.slow
def test_moved_run_folder_resumes(baseline, tmp_path):
    out = tmp_path / "run"
    assert train(out, ["--kill=stage1:3"]).returncode == -9
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    resumed = train(f"{moved}/")  # a trailing slash as well
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and same_as_baseline(baseline, moved)


@pytest.mark.slow
def test_kill_after_finishing_leaves_a_finished_run(tmp_path):
    out = tmp_path / "run"
    assert train(out, ["--kill=finished"]).returncode == -9
    assert (out / "finished.json").exists() and (out / "pipeline" / "model_index.json").exists()
    again = train(out)
    assert again.returncode == 0 and "finished run: nothing to do" in again.stdout + again.stderr


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_disk_full_keeps_the_previous_checkpoint(baseline, tmp_path):
    out = tmp_path / "run"
    stopped = train(out, ["--interrupt=stage2:3"])
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "error: interrupted in stage2 at step 3; the last checkpoint is stage2 step 2; run the same command to resume")
    assert "interrupted in stage2 at step 3" in (out / "train.log").read_text().splitlines()[-1]
    full = train(out, ["--disk_full=checkpoint"])  # resumes at stage2 step 2; the disk fills at the next save
    assert full.returncode == 1 and "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the disk is full: a checkpoint could not be written in {out}/resume (")
    assert "the previous checkpoint (stage2 step 2) is kept" in last
    resumed = train(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_as_baseline(baseline, out)


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_ends_with_one_line(baseline, tmp_path):
    """SIGTERM (timeout, docker stop, Slurm's scancel and time limit) ended a training with no line anywhere;
    now the step in progress ends, a checkpoint is written there, one line goes to stderr and train.log, and
    the same command continues to the uninterrupted run's weights."""
    out = tmp_path / "run"
    stopped = train(out, ["--term=stage2:3"])  # checkpoints every 2 steps: the next boundary is step 4
    line = "error: stopped by SIGTERM after stage2 step 4, with a checkpoint there; run the same command to resume"
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-1500:]
    assert stopped.stderr.strip().splitlines()[-1] == line
    assert line[len("error: "):] in (out / "train.log").read_text().splitlines()[-1]
    assert sorted(p.name for p in (out / "resume").iterdir())[-1] == "ckpt-000010"  # stage1's 6 + stage2's 4
    resumed = train(out)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-1500:]
    assert same_as_baseline(baseline, out)


@pytest.mark.slow
def test_second_training_into_a_held_folder_is_refused(tmp_path):
    import signal

    from attndreambooth.config.schema import ConfigError
    from attndreambooth.trainer.run_folder import hold_folder
    out = tmp_path / "run"
    lock = hold_folder(out)
    with pytest.raises(ConfigError, match=f"in use by a running training \\(pid {os.getpid()} on "):
        hold_folder(out)
    second = train(out)
    assert second.returncode == 1 and f"is in use by a running training (pid {os.getpid()}" in second.stderr
    lock.close()
    # a holder killed with SIGKILL leaves its lock file, never its lock
    code = ("import os, signal, sys; from attndreambooth.trainer.run_folder import "
            "hold_folder; h = hold_folder(__import__('pathlib').Path(sys.argv[1])); os.kill(os.getpid(), 9)")
    killed = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL and (out / ".lock").exists()
    hold_folder(out).close()


@pytest.mark.slow
def test_resume_refuses_a_changed_photo_set(tmp_path):
    """Killed after a few steps, then photos added or removed: the resumed run would train on the old data
    order over the new set; it refuses in one line naming what changed, and resumes once the set is back."""
    import shutil

    from conftest import SAMPLE
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE, photos)
    out = tmp_path / "run"
    killed = train(out, ["--kill=stage1:3"], **{"data.instance_dir": photos})
    assert killed.returncode == -9 and (out / "instance_images.json").is_file()
    extra = photos / "extra.jpg"
    shutil.copy(sorted(photos.glob("*.jpg"))[0], extra)
    (photos / "extra.jpg").write_bytes(extra.read_bytes() + b"\0")  # another file's bytes, one more
    refused = train(out, **{"data.instance_dir": photos})
    assert refused.returncode == 1 and "has changed since the run" in refused.stderr and "added extra.jpg" in refused.stderr
    extra.unlink()
    first = sorted(photos.glob("*.jpg"))[0]
    kept = first.read_bytes()
    first.unlink()
    refused = train(out, **{"data.instance_dir": photos})
    assert refused.returncode == 1 and f"removed {first.name}" in refused.stderr
    first.write_bytes(kept)
    resumed = train(out, **{"data.instance_dir": photos})
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]


@pytest.mark.slow
def test_a_hand_edited_config_is_refused_against_what_the_run_trained(tmp_path):
    """RUN/config.yaml edited by hand after a kill, then given as --config: another step count (fewer steps
    than the checkpoint's stage has done, or another count for a stage it finished) or another category was
    resumed as if the run had trained under it; now refused in one line before weights load, each key with
    the run's value first; the original command line and the restored file resume."""
    import re
    out = tmp_path / "run"
    assert train(out, ["--kill=stage2:4"]).returncode == -9  # checkpoints every 2 steps: stage2 step 4
    config = out / "config.yaml"
    original = config.read_text()

    def with_steps(stage, n):
        return re.sub(rf"({stage}:\n(?:  .*\n)*?    steps: )\d+", rf"\g<1>{n}", original)

    for text, words in ((with_steps("stage2", 3), "stages.stage2.steps: 6 in the run, 3 now"),
                        (with_steps("stage1", 5), "stages.stage1.steps: 6 in the run, 5 now"),
                        (original.replace("category: toy", "category: dog"), "data.category: 'toy' in the run, "
                                                                             "'dog' now")):
        config.write_text(text)
        refused = trainer(["--", "--config", str(config)])
        assert refused.returncode == 1 and words in refused.stderr, refused.stderr[-1500:]
        assert "Traceback" not in refused.stderr
    resumed = train(out)  # the original command line, config.yaml still edited: what the run trained goes on
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-1500:]
    assert "category: toy" in config.read_text()  # the run wrote back what it trains under


@pytest.mark.slow
def test_a_finished_run_recasts_its_pipeline_when_asked_and_refuses_what_it_cannot_rebuild(baseline, tmp_path):
    import torch
    import yaml
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    half = train(run, **{"runtime.pipeline_dtype": "fp16", "runtime.save_merged_pipeline": "true"})
    assert half.returncode == 0, half.stderr[-2000:]
    assert "save_merged_pipeline changed: it acts only on LoRA runs" in half.stderr
    assert "in fp16 (cast from the pipeline the run saved); the run is not trained again" in half.stderr
    full, cast = (load_file(next((p / "pipeline/unet").glob("*.safetensors"))) for p in (baseline, run))
    assert full.keys() == cast.keys() and all(torch.equal(cast[k], full[k].half()) for k in full)
    assert yaml.safe_load((run / "config.yaml").read_text())["runtime"]["pipeline_dtype"] == "fp16"
    kept = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    back = train(run, **{"runtime.pipeline_dtype": "fp32"})
    assert back.returncode == 1 and "Traceback" not in back.stderr
    assert back.stderr.strip().splitlines()[-1].startswith(
        "error: runtime.pipeline_dtype=fp32: the run's pipeline/ was saved in fp16, and the fp32 weights it came from")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == kept  # refused before anything was written


def test_a_nan_between_two_reads_is_caught_before_the_next_checkpoint(tmp_path):
    """A step reads nothing back: the loss is checked every runtime.log_every_steps steps and before each
    checkpoint. A NaN at stage 2's step 3, with reads at 4 and 8, stops the run at the read of step 4, naming
    step 3, before step 4's checkpoint: the newest checkpoint is stage 1's end, and no line of metrics.jsonl
    is non-finite."""
    out = tmp_path / "run"
    failed = train(out, ["--nan=stage2:3"], **{"runtime.checkpoint_every_steps": 4, "runtime.log_every_steps": 4})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "error: stage2 step 3: the loss is not finite" in failed.stderr.strip().splitlines()[-1]
    _, _, meta = Checkpointer(out, 2).load_latest()
    assert (meta["stage"], meta["step"], meta["done"]) == ("stage1", 6, True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [("stage1", s) for s in range(1, 7)]
    assert all(r["loss"] == r["loss"] for r in lines)  # no NaN written


def test_the_device_generator_is_part_of_the_sampler_state():
    """On a GPU the batch is drawn on a device generator of its own: its state goes into the checkpoint and
    comes back, so a resumed run draws the same batches (two CPU generators stand in for host and device)."""
    import torch

    from diffusers import DDPMScheduler

    from attndreambooth.families import SD
    from attndreambooth.trainer.data import LatentBatches, draw_noise

    def sampler():
        mean = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(9))
        return LatentBatches(mean, mean.abs(), 3, 0.5, torch.Generator().manual_seed(1), None,
                             torch.Generator().manual_seed(2))

    a = sampler()
    a.sample(2)
    state = a.state_dict()
    assert "device_generator" in state
    want = a.sample(2), draw_noise(a, torch.zeros(2, 4, 2, 2), SD(), DDPMScheduler())
    b = sampler()
    b.load_state_dict(state)
    got = b.sample(2), draw_noise(b, torch.zeros(2, 4, 2, 2), SD(), DDPMScheduler())
    assert torch.equal(want[0], got[0]) and all(torch.equal(x, y) for x, y in zip(want[1], got[1]))
    c = sampler()  # a checkpoint without it (written on a CPU) loads; the device generator is left as it was
    c.load_state_dict({k: v for k, v in state.items() if k != "device_generator"})
    assert torch.equal(c.device_gen.get_state(), torch.Generator().manual_seed(2).get_state())
    assert torch.equal(c.gen.get_state(), state["generator"]) and c.order == state["order"]


def test_speed_switches_may_change_on_resume_and_the_rest_may_not(tmp_path):
    """runtime.compile, its cache folder and the CUDA graph change how a step runs, not what it computes: a
    resume may switch them; a changed schedule is still refused (a run folder written by hand, no training)."""
    from attndreambooth.config.loading import load_config, to_yaml
    from attndreambooth.config.schema import ConfigError
    from attndreambooth.trainer.run_folder import run_folder_state
    from conftest import SAMPLE
    base = [f"output_dir={tmp_path}", f"data.instance_dir={SAMPLE}", "data.category=toy"]
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, base)))
    state, changes = run_folder_state(load_config(None, base + ["runtime.compile=regional",
                                                                f"runtime.compile_cache={tmp_path}/cc"]))
    assert state == "resume" and {k for k, _, _ in changes} == {"runtime.compile", "runtime.compile_cache"}
    with pytest.raises(ConfigError, match="stages.stage3.steps: 500 in the run, 400 now"):
        run_folder_state(load_config(None, base + ["stages.stage3.steps=400"]))
