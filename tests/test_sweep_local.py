"""The local launcher's --jobs workers when the sweep is stopped: no queued cell starts, the workers end,
and the sweep exits in seconds (it once slept on while its workers trained the cells already handed out)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def wait_for(check, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigterm_to_a_jobs_sweep_starts_no_queued_cell_and_exits_with_its_workers(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    sweep = subprocess.Popen([sys.executable, str(HERE / "sweep_interrupt.py"), str(tmp_path), "2", "6"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: len(list(tmp_path.glob("started_*"))) == 2, 120), "two workers never started"
        workers = subprocess.run(["pgrep", "-P", str(sweep.pid)], capture_output=True, text=True).stdout.split()
        assert sum(map(is_worker, workers)) == 2
        sweep.send_signal(signal.SIGTERM)  # to the sweep alone, as a scheduler's stop of the parent
        start = time.monotonic()
        out, _ = sweep.communicate(timeout=45)  # a started cell sleeps 60 s: only stopping it ends this early
        took = time.monotonic() - start
    finally:
        sweep.kill()
    assert sweep.returncode == 130 and "interrupted" in out, out
    assert took < 15, f"the sweep took {took:.1f} s to exit"
    assert sorted(p.name for p in tmp_path.glob("started_*")) == ["started_0", "started_1"]  # none of the queue
    assert not [pid for pid in workers if is_worker(pid)], "workers still running after the sweep exited"


def is_worker(pid):
    """A live spawn worker (the sweep's other child, multiprocessing's resource tracker, ends on its own)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
