"""The local launcher: the cells on this machine, one per GPU (CUDA_VISIBLE_DEVICES, a subprocess each), on a
CPU one at a time in this process or --jobs N at once in N worker processes with the cores shared out."""
import concurrent.futures
import multiprocessing
import os
import queue
import signal

import torch

from attndreambooth.sweep.cells import run_cell, stop_children


def visible_gpus():
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (a sweep started with CUDA_VISIBLE_DEVICES=2,3
    runs on 2 and 3, not on 0 and 1)."""
    count = torch.cuda.device_count()
    given = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return given[:count] if len(given) >= count else [str(g) for g in range(count)]


def slots(args):
    """Where cells run: one slot per GPU (its CUDA_VISIBLE_DEVICES), else --jobs CPU slots; a slot is the
    environment of its subprocesses, None for this process (one CPU job: no import cost per script)."""
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else visible_gpus()
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
    jobs = args.jobs or 1
    if jobs == 1:
        return [None]
    return [shared_cores(jobs)] * jobs


def job_slots(n):
    """The environments of n cells started at once as submitit's local jobs: the GPUs dealt out in turn (the
    local executor itself would hide them), or the cores shared out."""
    gpus = visible_gpus()
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)] if gpus else [shared_cores(n)] * n


def shared_cores(at_once):
    """The thread counts for one of `at_once` CPU processes: small models use two cores badly, so two 1-thread
    trainings did 1.7x the work of one 2-thread training, and more threads than cores spin."""
    threads = str(max(1, (os.cpu_count() or 1) // at_once))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_local(args, cells):
    """Every cell, each slot taking the next (the report reads their metrics back); a failed cell raises."""
    where = slots(args)
    if where == [None]:  # in this thread: torch's OpenMP threads of this one and of a pool thread would compete
        for cell in cells:  # (a training in a pool thread after torch work here ran 2x slower)
            run_cell(*cell, args, None)
        return None
    if "CUDA_VISIBLE_DEVICES" not in where[0]:  # CPU jobs: workers that import torch once
        return run_in_workers(args, cells, int(where[0]["OMP_NUM_THREADS"]))
    free = queue.Queue()
    for slot in where:
        free.put(slot)

    def task(cell):
        slot = free.get()
        try:
            return run_cell(*cell, args, slot)
        finally:
            free.put(slot)

    with concurrent.futures.ThreadPoolExecutor(len(where)) as pool:
        try:
            list(pool.map(task, cells))  # in order: the first failure is the one raised
        except KeyboardInterrupt:  # the running scripts end with their checkpoints; no cell starts after
            pool.shutdown(wait=False, cancel_futures=True)
            stop_children(signal.SIGINT)
            raise


def run_in_workers(args, cells, threads, work=run_cell):
    """--jobs N on a CPU: N long-lived processes of `threads` threads each run the cells' scripts in-process; a
    subprocess per script paid ~6 s of imports three times a cell (~12 % of a shapes cell's CPU time)."""
    spawn = multiprocessing.get_context("spawn")  # a fork of a process holding OpenMP threads can hang
    stop = spawn.Event()
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn, initializer=start_worker,
                                                initargs=(threads, stop)) as pool:
        try:
            list(pool.map(in_worker, [work] * len(cells), cells, [args] * len(cells)))
        except KeyboardInterrupt:  # a SIGINT to this process alone left the workers training on
            stop.set()  # the executor has already handed a worker the next cells: they must not start
            for worker in list((pool._processes or {}).values()):  # no public list of them
                if worker.is_alive():
                    os.kill(worker.pid, signal.SIGINT)  # each training stops at its step and logs "interrupted"
            pool.shutdown(wait=True, cancel_futures=True)  # the cells end in seconds; then the workers exit
            raise


STOP = None  # in a worker: the sweep's "start no further cell"


def start_worker(threads, stop):
    global STOP
    STOP = stop
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # the worker's own children too
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # idle, waiting for a cell: a Ctrl-C would kill it mid-protocol


def in_worker(work, cell, args):
    """One cell in a worker: skipped once the sweep is stopping; a Ctrl-C interrupts it (its training then
    ends at a step with its checkpoints), and the worker stays to take the executor's last word."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if STOP.is_set():  # after the handler: a stop set before its SIGINT came, while ignored, is seen here
            return None
        return work(*cell, args, None)
    finally:
        signal.signal(signal.SIGINT, previous)
