"""The model families behind one seam, checked against the code before it: every family's short run, full and
LoRA, saves the same bits as the digests recorded from that code (commit f620a7b; tests/data/<cpu>/
family_digests.json), and run folders that code left half-done (tests/data/<cpu>/old_runs: killed in stage 2 of
a full SD 2.x run, in stage 3 of an SDXL LoRA run) resume and end with the weights an uninterrupted run of that
code saved. Bits are one kind of CPU's arithmetic (AVX2 and AVX-512 kernels round differently: two thirds of
the tensors differ), so each kind has its own recording, <cpu> being torch's CPU capability, e.g. avx2."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import warm_runs
from conftest import ROOT
from family_runs import digest

CPU = torch.backends.cpu.get_cpu_capability().lower()  # the kernels torch dispatches to here
DATA = ROOT / "tests" / "data" / CPU
OLD_RUNS = {"tiny-full": ("tiny", []), "tiny-sdxl-lora": ("tiny-sdxl", ["stages.stage2.lora_rank=4",
                                                                        "stages.stage3.lora_rank=4"])}


def recorded(path):
    """A recording of this CPU's kind; none is a failure that says how to make one, not a skip."""
    assert path.exists(), (f"no recording for this CPU ({CPU}): run the code before the seam (git worktree add "
                           f"OLD f620a7b) as tests/data/avx2 was made, see tests/data/README.md")
    return path


def one_thread_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_every_family_saves_the_bits_the_code_before_the_seam_saved(tmp_path):
    out = tmp_path / "digests.json"
    done = subprocess.run([sys.executable, str(ROOT / "tests/family_runs.py"), str(out)], env=one_thread_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = json.loads(recorded(DATA / "family_digests.json").read_text()), json.loads(out.read_text())
    assert want.keys() == got.keys()
    for run in want:
        assert want[run].keys() == got[run].keys(), run
        assert [k for k in want[run] if want[run][k] != got[run][k]] == [], run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OLD_RUNS))
def test_a_run_folder_from_before_the_seam_resumes_to_its_weights(tmp_path, name):
    layout, extra = OLD_RUNS[name]
    out = tmp_path / name
    shutil.copytree(recorded(DATA / "old_runs" / name), out)
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), f"model.pretrained={layout}", "runtime.tensorboard=false",
            f"output_dir={out}", "stages.stage1.steps=3", "stages.stage2.steps=3", "stages.stage3.steps=3",
            "data.views_per_image=2", "runtime.checkpoint_every_steps=2", *extra]
    done = warm_runs.run(["--", *argv], one_thread_env())  # a new process, forked with the imports done
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    want = json.loads((DATA / "old_runs" / "expected_digests.json").read_text())[name]
    got = digest(out)
    assert want.keys() == got.keys() and [k for k in want if want[k] != got[k]] == []
