"""The sweep beyond one machine: submitit's local executor end to end (real subprocesses), a fake Slurm on
PATH (what is submitted, what is resubmitted after a failure, nothing finished resubmitted, a submitted cell
run from its pickle), and the one-line refusals before anything is submitted."""
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import fake_slurm
from attndreambooth.sweep import jobs
from conftest import SAMPLE, script

sweep = script("sweep")

submitit = pytest.importorskip("submitit", reason="submitit is in requirements-dev.txt")
SMALL = [f"--set={k}={v}" for k, v in [("model.pretrained", "tiny"), ("data.resolution", 64),
                                       ("data.views_per_image", 2), ("runtime.tensorboard", "false")]]
SMALL += [f"--set=stages.stage{i}.steps=2" for i in (1, 2, 3)]
METHODS = ("attndreambooth", "ablations/no_reg")


def grid(out):
    """Two cells of the tiny model: one concept, two methods, one image of two sampler steps per prompt."""
    return ["--concepts", f"toy={SAMPLE}:toy", "--methods", ",".join(METHODS), "--num_images", "1",
            "--infer_args=--steps 2", "--clip", "tiny", "--dino", "tiny", "--out", str(out), *SMALL]


def cell(out, method):
    return out / "toy" / method.replace("/", "_")


@pytest.fixture()
def slurm(tmp_path, monkeypatch):
    """A fake Slurm first on PATH; submitit's shared sacct watcher forgotten after (a new process's view)."""
    home = tmp_path / "slurm"
    monkeypatch.setenv("PATH", f"{fake_slurm.install(home)}:{os.environ['PATH']}")
    monkeypatch.setattr(jobs, "POLL_S", 0.2)
    yield home
    submitit.SlurmJob.watcher.clear()


def new_process():
    submitit.SlurmJob.watcher.clear()  # a rerun is a new process: nothing cached from the last one


@pytest.mark.slow
def test_submitit_local_runs_the_grid_and_a_rerun_submits_nothing(tmp_path, monkeypatch, capsys):
    """--launcher submitit-local: both cells as jobs of submitit's local executor (each its own process tree,
    started at once with the cores shared out), the report from their metrics, jobs.json naming the jobs;
    the same command again finds both finished and submits nothing."""
    monkeypatch.setattr(jobs, "POLL_S", 0.2)
    out = tmp_path / "s"
    start = time.perf_counter()
    results = sweep.main([*grid(out), "--launcher", "submitit-local"])
    wall = time.perf_counter() - start
    for m in METHODS:
        metrics = json.loads((cell(out, m) / "eval" / "metrics.json").read_text())
        assert results[("toy", m, None)] == metrics and (cell(out, m) / "run" / "finished.json").is_file()
        timings = json.loads((cell(out, m) / "timings.json").read_text())  # the cell's cost, by part
        assert set(timings) == {"train_attndreambooth", "infer", "evaluate", "processes", "resumed", "machine"}
        assert timings["machine"].endswith(f"torch {torch.backends.cpu.get_cpu_capability()} kernels")  # a CPU job
        parts = [timings[k] for k in ("train_attndreambooth", "infer", "evaluate")]
        assert all(t > 0 for t in parts) and sum(parts) < wall  # the parts of a cell that ran within the sweep
    record = json.loads((out / "jobs.json").read_text())
    assert {v["launcher"] for v in record.values()} == {"submitit-local"} and len(record) == 2
    logs = {p.name for p in (out / "jobs").iterdir() if p.name != "%j"}
    assert logs == {v["job_id"] for v in record.values()}  # one folder of submitit's logs per job
    table = (out / "sweep.md").read_text()
    assert sorted(re.findall(r"^\| toy \| ([\w/]+) \|", table, re.M)) == sorted(METHODS)
    capsys.readouterr()
    again = sweep.main([*grid(out), "--launcher", "submitit-local"])
    said = capsys.readouterr().out
    assert "2 of 2 cells finished before, 0 still queued or running as Slurm jobs, 0 to submit" in said
    assert again == results and {p.name for p in (out / "jobs").iterdir() if p.name != "%j"} == logs


@pytest.mark.slow
def test_slurm_submits_one_array_resubmits_only_what_failed_and_waits(tmp_path, slurm, monkeypatch, capsys):
    out = tmp_path / "s"
    options = ["--launcher", "slurm", "--partition", "gpu", "--gpus_per_task", "2", "--time", "1:30:00",
               "--array_parallelism", "1", "--sbatch", "mail-type=END", "--sbatch", "exclusive", "--sbatch", "nice=0",
               "--setup", "module load cuda"]
    sweep.main([*grid(out), *options, "--detach"])
    script = (slurm / "sbatch_100.sh").read_text()
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --time=90", "#SBATCH --mail-type=END", "#SBATCH --exclusive", "#SBATCH --nice=0", "#SBATCH --ntasks-per-node=1",
                 "module load cuda"):
        assert line in script.splitlines(), (line, script)
    record = json.loads((out / "jobs.json").read_text())
    first, second = (record[f"toy/{m.replace('/', '_')}"]["job_id"] for m in METHODS)
    assert (first, second) == ("100_0", "100_1") and len(fake_slurm.calls(slurm, "sbatch")) == 1
    # a dry run reads jobs.json: the queued jobs are shown as waited for, not promised as new submissions
    fake_slurm.set_states(slurm, **{first: "RUNNING", second: "PENDING"})
    new_process()
    capsys.readouterr()
    assert sweep.main([*grid(out), *options, "--dry_run"]) is None
    said = capsys.readouterr().out
    assert f"waited (Slurm job {first}, RUNNING)  toy / attndreambooth" in said and f"(Slurm job {second}, PENDING)" in said
    assert "0 of 2 cells would be submitted as one job array (slurm), 2 waited for" in said
    assert len(fake_slurm.calls(slurm, "sbatch")) == 1

    # the first cell's job runs (here, from the pickle the sweep submitted; two processes train, as its two
    # GPUs would) and finishes; the second cell's job fails
    from submitit.core.utils import DelayedSubmission
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = DelayedSubmission.load(out / "jobs" / first / f"{first}_submitted.pkl")
    assert job.function.processes == 2 and job.function.cell[3] == METHODS[0]
    job.result()
    assert "trained by 2 processes" in (cell(out, METHODS[0]) / "run" / "config.yaml").read_text()
    fake_slurm.set_states(slurm, **{first: "COMPLETED", second: "FAILED"})
    new_process()
    capsys.readouterr()
    sweep.main([*grid(out), *options, "--detach"])
    assert "1 of 2 cells finished before, 0 still queued or running as Slurm jobs, 1 to submit" in capsys.readouterr().out
    resubmitted = (slurm / "sbatch_101.sh").read_text()
    assert "--array" not in resubmitted and len(fake_slurm.calls(slurm, "sbatch")) == 2  # the failed cell alone
    record = json.loads((out / "jobs.json").read_text())
    assert record["toy/attndreambooth"]["job_id"] == first and record["toy/ablations_no_reg"]["job_id"] == "101"
    pickle = DelayedSubmission.load(out / "jobs" / "101" / "101_submitted.pkl")
    assert pickle.function.cell[3] == METHODS[1]

    fake_slurm.set_states(slurm, **{first: "COMPLETED", second: "FAILED", "101": "RUNNING"})
    new_process()
    sweep.main([*grid(out), *options, "--detach"])  # still running: left alone, nothing submitted
    assert len(fake_slurm.calls(slurm, "sbatch")) == 2

    fake_slurm.set_states(slurm, **{first: "COMPLETED", second: "FAILED", "101": "PREEMPTED"})
    (slurm / "default_state").write_text("FAILED")  # the next job fails too; this time the sweep waits
    new_process()
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"error: 1 of 2 cells failed \(named above\); rerun the same command"):
        sweep.main([*grid(out), *options])
    said = capsys.readouterr().out
    assert len(fake_slurm.calls(slurm, "sbatch")) == 3 and "job 102 ended (FAILED) without the cell's metrics" in said
    table = (out / "sweep.md").read_text()  # the report of what finished
    assert re.findall(r"^\| toy \| ([\w/]+) \|", table, re.M) == [METHODS[0]]

    waiting = ("toy", SAMPLE, "toy", METHODS[1], None)
    assert jobs.check_no_slurm_jobs(out, [waiting]) is None  # its job ended: the local launcher may take it
    fake_slurm.set_states(slurm, **{"102": "RUNNING"})
    new_process()
    with pytest.raises(SystemExit, match=r"^error: .*: cell toy / ablations/no_reg was submitted to Slurm as job 102, "
                                         r"which is RUNNING; rerun with --launcher slurm to wait for it"):
        sweep.main(grid(out))  # the local launcher on a cell a Slurm job is running: refused
    with pytest.raises(SystemExit, match=r"was submitted to Slurm as job 102, which is RUNNING"):
        sweep.main([*grid(out), "--launcher", "submitit-local"])  # and submitit's local executor


def refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    code = e.value.code
    return code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_sweep_input_is_one_line_before_anything_is_submitted(tmp_path, slurm, capsys):
    out = tmp_path / "s"
    base = [*grid(out), "--launcher", "slurm"]
    (tmp_path / "cluster.yaml").write_text("partition: gpu\ngpus: 2\n")
    (tmp_path / "list.yaml").write_text("- partition\n")
    (tmp_path / "broken.yaml").write_text("partition: [gpu\n")
    (tmp_path / "zero.yaml").write_text("gpus_per_task: 0\n")
    (tmp_path / "part.yaml").write_text("partition: gpu\ntime: 30\n")
    for argv, message in (
            ([*grid(out), "--launcher", "pbs"], "argument --launcher: invalid choice: 'pbs'"),
            ([*base, "--partition", ""], "error: --partition: '': give a partition's name (one word)"),
            ([*base, "--partition", "gpu a100"], "error: --partition: 'gpu a100': give a partition's name"),
            ([*base, "--gpus_per_task", "0"], "error: --gpus_per_task: '0': give a whole number of 1 or more"),
            ([*base, "--gpus_per_task", "-2"], "error: --gpus_per_task: '-2': give a whole number of 1 or more"),
            ([*base, "--gpus_per_task", "two"], "error: --gpus_per_task: 'two': give a whole number"),
            ([*base, "--time", "0"], "error: --time: '0': give a positive time limit"),
            ([*base, "--time", "soon"], "error: --time: 'soon': give a positive time limit"),
            ([*base, "--sbatch", "partition=big"], "error: --sbatch: partition: set by the sweep itself or by its "
                                                   "own option (--partition)"),
            ([*base, "--sbatch", "mail-type=END", "--sbatch=9lives"], "error: --sbatch: 9lives=True: give an sbatch "
                                                                    "option's long name"),
            ([*base, "--sbatch", "mail type=END"], "error: --sbatch: mail type='END': give an sbatch option's long name"),
            ([*base, "--cluster_config", str(tmp_path / "cluster.yaml")], "unknown option 'gpus' (options: "),
            ([*base, "--cluster_config", str(tmp_path / "list.yaml")], "give a mapping of options"),
            ([*base, "--cluster_config", str(tmp_path / "broken.yaml")], "not YAML"),
            ([*base, "--cluster_config", str(tmp_path / "zero.yaml")], "zero.yaml: gpus_per_task: 0: give a whole"),
            ([*base, "--cluster_config", str(tmp_path / "none.yaml")], "none.yaml: cannot be read"),
            ([*grid(out), "--partition", "gpu"], "error: --partition is an option of --launcher slurm"),
            ([*grid(out), "--cluster_config", str(tmp_path / "part.yaml")], "error: --cluster_config is an option of "
                                                                            "--launcher slurm"),
            ([*grid(out), "--launcher", "submitit-local", "--cluster_config", str(tmp_path / "cluster.yaml")],
             "cluster.yaml: unknown option 'gpus'"),
            ([*grid(out), "--launcher", "submitit-local", "--cluster_config", str(tmp_path / "part.yaml")],
             f"error: --cluster_config {tmp_path / 'part.yaml'}: partition: a Slurm option; --launcher submitit-local"),
            ([*base, "--jobs", "2"], "error: --jobs is an option of --launcher local"),
            ([*grid(out), "--launcher", "submitit-local", "--detach"], "error: --detach: a Slurm option"),
            ([*grid(out), "--num_images", "0"], "error: --num_images 0: give 1 or more"),
            ([*grid(out), "--num_prompts", "-1"], "error: --num_prompts -1: give 1 or more"),
            ([*grid(out), "--sampler_steps", "0"], "error: --sampler_steps 0: give 1 or more"),
            ([*grid(out), "--sampler_batch", "0"], "error: --sampler_batch 0: give 1 or more"),
            ([*grid(out), "--step_scale", "0"], "error: --step_scale 0.0: give a finite number above 0"),
            ([*grid(out), "--step_scale", "inf"], "error: --step_scale inf: give a finite number above 0")):
        said = refused(argv, capsys)
        assert message in said and "\n" not in said, (message, said)
    assert fake_slurm.calls(slurm, "sbatch") == [] and not out.exists()


def test_slurm_refusals_that_need_the_machine(tmp_path, slurm, monkeypatch, capsys):
    """submitit missing, no Slurm commands, sbatch's own refusal, and an --out a local sweep holds."""
    out = tmp_path / "s"
    base = [*grid(out), "--launcher", "slurm"]
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert refused(base, capsys) == "error: --launcher slurm needs submitit, an optional extra: pip install submitit"
    monkeypatch.undo()
    monkeypatch.setattr(jobs, "POLL_S", 0.2)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert refused(base, capsys).startswith("error: --launcher slurm: no sbatch on PATH; run the sweep on a Slurm")
    assert refused([*base, "--report_only"], capsys).startswith("error: --report_only: no finished cell")  # reads only
    monkeypatch.setenv("PATH", f"{slurm / 'bin'}:/usr/bin:/bin")
    from attndreambooth.trainer.run_folder import hold_folder
    running = hold_folder(out, "--out", "a running sweep")  # a local sweep on the same --out
    assert refused(base, capsys).startswith(f"error: --out {out} is in use by a running sweep (pid ")
    running.close()
    assert fake_slurm.calls(slurm, "sbatch") == []
    (slurm / "refuse").write_text("sbatch: error: invalid partition specified: nope")
    assert refused([*base, "--partition", "nope"], capsys) == (
        "error: submitting 2 cells failed: sbatch: error: invalid partition specified: nope")
    assert not (out / "jobs.json").exists()  # nothing was submitted, nothing recorded
    (out / "jobs.json").write_text("{not json")
    (slurm / "refuse").unlink()
    assert refused(base, capsys).startswith(f"error: {out / 'jobs.json'}: cannot be read (")
    assert refused([*base, "--dry_run"], capsys).startswith(f"error: {out / 'jobs.json'}: cannot be read (")
    (out / "jobs.json").unlink()
    capsys.readouterr()
    assert sweep.main([*base, "--partition", "gpu", "--dry_run"]) is None
    said = capsys.readouterr().out
    assert "2 of 2 cells would be submitted as one job array (slurm" in said and "slurm_partition: 'gpu'" in said
    assert len(fake_slurm.calls(slurm, "sbatch")) == 1  # the refused one only: a dry run submits nothing


@pytest.mark.slow
def test_the_multinode_sbatch_example_trains(tmp_path, slurm):
    """docs/slurm/train_multinode.sbatch as Slurm would run it, on one node of two CPU processes: the stand-in
    srun runs its torchrun here, which meets itself at the address scontrol gives; the run trains and is
    written once. Its header asks for what its command starts (a process per GPU of each node)."""
    import subprocess

    from conftest import ROOT, tiny_overrides
    from test_train import free_port
    script = ROOT / "docs" / "slurm" / "train_multinode.sbatch"
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))
    assert header["nodes"] == "2" and header["ntasks-per-node"] == "1" and header["gpus-per-node"] == "8"
    env = dict(os.environ, SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="7", PROCESSES_PER_NODE="2",
               CONFIG="configs/tiny.yaml", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PATH=f"{slurm / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(script), *tiny_overrides(tmp_path / "run", **{"runtime.tensorboard": "false"})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("# trained by 2 processes")
    assert (tmp_path / "run" / "finished.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 9  # one writer, 9 steps
    assert [c[0] for c in fake_slurm.calls(slurm, "srun")] == ["torchrun"]


def test_the_cluster_guides_examples_are_valid(monkeypatch):
    """Every sweep command the guides show (clusters, evaluation, the shapes overview) parses, with its cluster options checked as a run would check
    them; docs/slurm/sweep_cluster.yaml is a valid --cluster_config."""
    import shlex

    from attndreambooth.sweep import cluster
    from conftest import ROOT
    monkeypatch.chdir(ROOT)  # the guide's paths are the checkout's
    readme = "\n".join((ROOT / "docs" / page).read_text() for page in ("clusters.md", "evaluation.md",
                                                                       "reports/shapes_overview.md"))
    assert "docs/slurm/train_multinode.sbatch" in readme
    commands = [c.replace("\\\n", " ") for c in re.findall(r"^python scripts/sweep\.py (?:.*\\\n)*.*$", readme, re.M)]
    assert any("--launcher slurm" in c for c in commands) and len(commands) >= 3
    for command in commands:
        args = sweep.parser().parse_args(shlex.split(command, comments=True)[2:])
        options = cluster.cluster_options(args)
        if args.launcher == "slurm":
            assert options["partition"] == "gpu" and options["array_parallelism"] == 16
    yaml_options = cluster.read_config(ROOT / "docs" / "slurm" / "sweep_cluster.yaml")
    assert yaml_options["time"] == 120 and yaml_options["sbatch"] == {"mail_type": "END"}
    assert cluster.executor_parameters({**yaml_options, "gpus_per_task": 1}, "slurm")["slurm_setup"] == ["module load cuda"]
