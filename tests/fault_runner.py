"""The trainer as a user runs it, with faults injected through its hooks (nothing is read from the
environment): python tests/fault_runner.py [--kill P] [--interrupt P] [--disk_full P] [--nan P] -- ARGS

P is a hook point, "stage1:3" (after step 3 of stage1), "stage1:end", "checkpoint" (inside a
checkpoint write) or "finished"; "P#k" fires at its k-th time.
"""
import argparse
import errno
import os
import signal
import sys
from collections import Counter

import train_attndreambooth
from attndreambooth.trainer.method import FaultInjection


class InjectedFaults(FaultInjection):
    def __init__(self, kill=None, interrupt=None, term=None, disk_full=None, nan=None):
        self.kill, self.interrupt, self.term, self.disk_full, self.nan = kill, interrupt, term, disk_full, nan
        self.hits = Counter()

    def at(self, point):
        self.hits[point] += 1
        here = (point, f"{point}#{self.hits[point]}")
        if self.kill in here:
            os.kill(os.getpid(), signal.SIGKILL)  # as a pre-empted machine
        if self.interrupt in here:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C
        if self.term in here:
            os.kill(os.getpid(), signal.SIGTERM)  # as timeout, docker stop, Slurm's scancel
        if self.disk_full in here:
            raise OSError(errno.ENOSPC, "No space left on device")

    def loss(self, point, loss):
        return loss * float("nan") if point == self.nan else loss


def main(argv):
    """Faults before "--", the trainer's arguments after it."""
    # Ctrl-C as in a terminal: a shell that starts the test suite in the background (`cmd &`) passes SIGINT
    # on ignored, and Python then installs no KeyboardInterrupt handler, so the injected Ctrl-C did nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = argparse.ArgumentParser()
    for name in ("kill", "interrupt", "term", "disk_full", "nan"):
        p.add_argument(f"--{name}")
    split = argv.index("--")
    faults = p.parse_args(argv[:split])
    train_attndreambooth.main(argv[split + 1:], faults=InjectedFaults(**vars(faults)))


if __name__ == "__main__":
    main(sys.argv[1:])
