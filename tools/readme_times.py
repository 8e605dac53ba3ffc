"""Measure the README's commands and record one figure for each in docs/reports/readme_times.json; the README quotes
exactly these (tests/test_readme_times.py checks it), so its times cannot drift from a measurement.

    python tools/readme_times.py demo infer quick_sweep tests quick_tests   # or any of them; `--print` shows the table

Each command runs as the README gives it, in a fresh temporary folder (the demo also builds the tiny model
there, as on a fresh machine), and its wall time is recorded with the machine, torch's version and the
date. A timing is only taken on a quiet machine: the script waits until the 1-minute load average is below
0.5 (another job would make the figure that job's, not the command's) and refuses to record otherwise."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attndreambooth.machine import machine

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "reports" / "readme_times.json"
COMMANDS = {  # name -> the README's command line (run from the checkout; {tmp} is a fresh folder)
    "demo": [sys.executable, "train_attndreambooth.py", "--config", "configs/tiny.yaml", "output_dir={tmp}/tiny"],
    "infer": [sys.executable, "infer.py", "{tmp}/tiny", "--prompt", "a photo of {}", "--num_images", "4"],
    "quick_sweep": [sys.executable, "scripts/sweep.py", "--world", "shapes", "--out", "{tmp}/shapes_quick", "--quick"],
    "tests": [sys.executable, "-m", "pytest", "-q", "-n", "2", "tests"],
    "quick_tests": [sys.executable, "-m", "pytest", "-q", "-n", "2", "-m", "not slow", "tests"],
}
NEEDS = {"infer": "demo"}  # infer samples from the demo's run folder
QUIET_LOAD = 0.5


def wait_quiet(limit_s=600):
    """Block until the 1-minute load average is below QUIET_LOAD; False if it never gets there."""
    end = time.time() + limit_s
    while os.getloadavg()[0] >= QUIET_LOAD:
        if time.time() > end:
            return False
        time.sleep(10)
    return True


def format_seconds(seconds):
    """How the README writes a time: '48 s', '2 min 10 s'."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60} s"


def measure(name, tmp):
    """Wall seconds of one README command in the checkout, with the model cache in `tmp` (a fresh machine)."""
    env = dict(os.environ, ATTNDB_CACHE=str(Path(tmp) / "cache"))
    cmd = [a.replace("{tmp}", str(tmp)) for a in COMMANDS[name]]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {name} failed ({' '.join(cmd)}):\n{(done.stdout + done.stderr)[-2000:]}")
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"what to measure: any of {', '.join(COMMANDS)}")
    p.add_argument("--print", action="store_true", help="print the recorded table")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in COMMANDS]
    if unknown:
        p.error(f"{', '.join(unknown)}: not a README command; choose from {', '.join(COMMANDS)}")
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    measured = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.names:
                for needed in [NEEDS.get(name)] if NEEDS.get(name) and not (Path(tmp) / "tiny").is_dir() else []:
                    measure(needed, tmp)  # not recorded: it only makes what `name` reads
                if not wait_quiet():
                    sys.exit(f"error: the machine is busy (load average {os.getloadavg()[0]:.1f} >= {QUIET_LOAD}); "
                             f"stop other jobs and measure again: nothing was recorded for {name}")
                seconds = measure(name, tmp)
                measured[name] = dict(seconds=round(seconds, 1), text=format_seconds(seconds), machine=machine(),
                                      torch=__import__("torch").__version__, date=time.strftime("%Y-%m-%d"))
                print(f"{name}: {format_seconds(seconds)}")
    finally:
        # Recorded once, after the last command: the test suite checks that the docs quote the record, so a
        # figure written between two measurements would fail the next one's tests until the docs caught up.
        if measured:
            record.update(measured)
            RECORD.write_text(json.dumps(record, indent=1) + "\n")
    if args.print:
        for name, r in record.items():
            print(f"{name:12s} {r['text']:>12s}  {r['machine']}, torch {r['torch']}, {r['date']}")


if __name__ == "__main__":
    main()
