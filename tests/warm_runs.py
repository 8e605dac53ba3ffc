"""`python tests/fault_runner.py ARGS` in a new process forked from one that has imported the trainer
already (multiprocessing's forkserver with the imports preloaded): its own process, environment, working
folder, exit status (-9 when killed), stdout and stderr, as subprocess.run gives them, without the ~6 s a
new interpreter spends importing diffusers and transformers. The resume tests start ~40 trainings."""
import atexit
import multiprocessing
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ["fault_runner", "attndreambooth.trainer.run", "attndreambooth.trainer.preflight",
           "attndreambooth.families.source", "diffusers", "transformers", "accelerate"]
_context = None


def _child(argv, env, out, err, threads):
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(env)  # the caller's, as subprocess.run(env=...) would pass it
    os.chdir(ROOT)
    import torch
    torch.set_num_threads(threads)  # what OMP_NUM_THREADS gives a new interpreter
    import fault_runner
    try:
        fault_runner.main(argv)
    finally:
        atexit._run_exitfuncs()  # a forked child leaves with os._exit: run what an interpreter's exit runs


def run(argv, env, timeout=600):
    """subprocess.CompletedProcess of fault_runner.py with `argv`, run as a new process with `env`."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        threads = int(env.get("OMP_NUM_THREADS", os.cpu_count()))
        process = _context.Process(target=_child, args=(list(argv), dict(env), str(out), str(err), threads))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["fault_runner.py", *argv], timeout)
        return subprocess.CompletedProcess(["fault_runner.py", *argv], process.exitcode,
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))

