"""SIGTERM, what `timeout`, `docker stop` and Slurm's scancel or time limit send: a training in its steps
finishes the step it is in, writes a checkpoint there and ends with one line; before or between the steps it
ends at once, as Ctrl-C does. Either way the same command continues the run."""
import signal
import threading


class Stopped(Exception):
    """SIGTERM stopped the training at a step boundary, after a checkpoint there."""


class SigtermStop:
    """While installed (a context manager, main thread only; elsewhere it does nothing), SIGTERM asks the
    step loop to stop at its next step boundary (`requested`, read by method.train_stage while `in_steps`)."""

    def __init__(self):
        self.requested, self.in_steps, self.previous = False, False, None

    def __enter__(self):
        self.requested, self.in_steps = False, False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        self.in_steps = False
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False

    def _handle(self, signum, frame):
        if not self.in_steps:
            raise KeyboardInterrupt  # loading or saving: as Ctrl-C, the last checkpoint stays
        self.requested = True


SIGTERM_STOP = SigtermStop()  # the process's one handler state
