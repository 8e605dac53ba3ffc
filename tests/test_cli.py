"""The commands' help: examples print as written, defaults are shown, --help answers without importing
torch, and both spellings of an option work."""
import subprocess
import sys
import time

import pytest

from attndreambooth.cli import Parser
from conftest import ROOT


@pytest.mark.parametrize("command", ["train_attndreambooth.py", "infer.py"])
def test_help_prints_examples_as_written_without_importing_torch(command):
    probe = (f"import sys, runpy; sys.argv = [{command!r}, '--help']\n"
             f"try:\n    runpy.run_path({command!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    seconds = time.perf_counter() - start
    assert out.rstrip().endswith("NO TORCH"), out[-200:]
    source = (ROOT / command).read_text()
    continued = [line for line in source.split('"""', 2)[1].splitlines() if line.endswith("\\")]
    assert continued and all(line in out.splitlines() for line in continued)  # each example line as written
    assert seconds < 3, seconds  # a second on a quiet machine; the suite's other work shares the CPU


def test_both_spellings_and_defaults_shown():
    p = Parser(description="x")
    p.add_argument("--dry_run", action="store_true")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="a seed")
    p.add_argument("--out", help="output folder")
    assert vars(p.parse_args(["--dry-run", "--num-images=3"])) == dict(dry_run=True, num_images=3, seed=0, out=None)
    assert vars(p.parse_args(["--dry_run", "--num_images", "2"]))["num_images"] == 2
    assert p.parse_args(["--out=runs/a-b"]).out == "runs/a-b"
    text = p.format_help()
    assert "images per prompt (default: 4)" in text and "a seed (default: 0)" in text
    assert "output folder\n" in text and "(default: None)" not in text


def test_the_trainer_accepts_dry_run_both_ways():
    import train_attndreambooth as T
    assert T.parse_args(["--dry-run", "a=1"]).dry_run and T.parse_args(["a=1", "--dry_run"]).dry_run
