"""A sweep's --jobs N workers, with cells that only wait: python tests/sweep_interrupt.py FOLDER JOBS CELLS.
Each cell writes FOLDER/started_<i> and sleeps; the process stops on SIGTERM as scripts/sweep.py does."""
import signal
import sys
import time
from argparse import Namespace
from pathlib import Path

from attndreambooth.sweep.local import run_in_workers
from conftest import script


def waiting_cell(index, folder, args, slot):
    (Path(folder) / f"started_{index}").write_text("")
    time.sleep(60)  # as a training: a Ctrl-C ends it at once


if __name__ == "__main__":
    folder, jobs, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    signal.signal(signal.SIGTERM, script("sweep").interrupt)
    try:
        run_in_workers(Namespace(jobs=jobs), [(i, folder) for i in range(count)], 1, work=waiting_cell)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
