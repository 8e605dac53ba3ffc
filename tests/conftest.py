import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The tiny model is built once per test session, in a private cache.
os.environ.setdefault("ATTNDB_CACHE", tempfile.mkdtemp(prefix="attndb-test-cache-"))
SAMPLE = ROOT / "data" / "sample_toy"
SHARED = ROOT.parent / "shared"
# Under pytest-xdist (`-n N`) each worker takes its share of the cores, it and the processes it spawns:
# N workers at torch's default thread count would oversubscribe the machine and slow every test.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def script(name):
    """A command of scripts/ or tools/ as a module, registered as script_<name>: scripts/ is on no import path,
    so evaluate.py shadows no package of that name."""
    import importlib.util
    import sys
    key = f"script_{name}"
    if key not in sys.modules:
        path = next(p for p in (ROOT / "scripts" / f"{name}.py", ROOT / "tools" / f"{name}.py") if p.is_file())
        spec = importlib.util.spec_from_file_location(key, path)
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


@pytest.fixture(scope="session")
def tiny_dir():
    from attndreambooth.families.source import tiny_model_dir
    return tiny_model_dir()


@pytest.fixture()
def tiny_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (precision may differ between tests)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    yield


def tiny_overrides(out, **kw):
    """Config overrides for a short tiny run."""
    base = dict(output_dir=str(out), **{"stages.stage1.steps": 3, "stages.stage2.steps": 3,
                                        "stages.stage3.steps": 3, "data.views_per_image": 2})
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture()
def deterministic():
    """Deterministic kernels, as `python -m worlds.shapes3` runs: with two threads some CPU backward passes are not bitwise repeatable."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
