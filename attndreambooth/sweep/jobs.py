"""The cells as cluster jobs, through submitit: one job array per submission, one task per cell. OUT/jobs.json
records which job runs which cell, so a rerun of the same command resubmits only the cells whose jobs ended
without the cell's metrics (failed, timed out, preempted, cancelled: their trainings resume from their own
checkpoints), waits for the ones still queued or running, and never submits a finished cell."""
import importlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from attndreambooth.sweep.cells import CellJob, cell_name, cell_path, finished, metrics_file
from attndreambooth.sweep.cluster import executor_parameters
from attndreambooth.sweep.local import job_slots

RECORD = "jobs.json"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "READY",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}  # sacct's states of a job that may still finish
POLL_S = 30  # seconds between looks at the cells' metrics while waiting (sacct is asked less often, by submitit)


def require_submitit(launcher):
    try:
        importlib.import_module("submitit")
    except ImportError:
        raise SystemExit(f"error: --launcher {launcher} needs submitit, an optional extra: "
                         "pip install submitit") from None


def require_slurm():
    """submitit's Slurm executor calls sbatch and sacct and needs srun beside them: a login node's commands."""
    if missing := [c for c in ("sbatch", "sacct", "srun") if shutil.which(c) is None]:
        raise SystemExit(f"error: --launcher slurm: no {missing[0]} on PATH; run the sweep on a Slurm login node "
                         "(or --launcher submitit-local to try the jobs on this machine)")


def cell_key(cell):
    return cell_path("", cell).as_posix()


def last_line(text, fallback):
    """A message's last non-empty line: what sbatch or a failed cell said last."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else fallback


def read_record(out):
    path = Path(out) / RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {path}: cannot be read ({e}); move it aside (the cells' jobs are then unknown "
                         "to the sweep and their unfinished cells are submitted again)") from None


def write_record(out, record):
    path = Path(out) / RECORD
    tmp = path.with_name(f".tmp-{RECORD}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)  # a kill mid-write leaves the previous record


def slurm_job(out, job_id):
    import submitit
    return submitit.SlurmJob(folder=Path(out) / "jobs" / "%j", job_id=job_id)


def slurm_states(out, job_ids):
    """{job id: sacct's state word} in one sacct call for all (submitit's watcher asks for the jobs registered
    with it, and otherwise waits seconds before asking again: one at a time, later jobs would read UNKNOWN)."""
    jobs = {i: slurm_job(out, i) for i in job_ids}
    if not jobs:
        return {}
    next(iter(jobs.values())).watcher.update()
    return {i: (j.watcher.get_state(i, mode="cache").split() or ["UNKNOWN"])[0] for i, j in jobs.items()}


def slurm_submitted(out, cells):
    """{cell: its recorded Slurm job id} for the unfinished cells that jobs.json says were submitted to Slurm."""
    record, done = read_record(out), finished(out, cells)
    return {c: record[cell_key(c)]["job_id"] for c in cells
            if c not in done and record.get(cell_key(c), {}).get("launcher") == "slurm"}


def recorded_slurm_states(out, cells):
    """({cell: its recorded Slurm job id}, {job id: state}) for the unfinished cells jobs.json says went to
    Slurm; the states are empty where this machine cannot ask (no sacct or no submitit)."""
    submitted = slurm_submitted(out, cells)
    askable = submitted and shutil.which("sacct") and importlib.util.find_spec("submitit")
    return submitted, slurm_states(out, set(submitted.values())) if askable else {}


def sort_cells(out, cells, launcher):
    """(finished, {cell: its job still queued or running}, cells to submit). Only Slurm's jobs outlive the
    process that submitted them; submitit-local's ended with it."""
    done = finished(out, cells)
    recorded = slurm_submitted(out, cells) if launcher == "slurm" else {}
    states = slurm_states(out, set(recorded.values()))
    running = {c: slurm_job(out, i) for c, i in recorded.items() if states[i] in ACTIVE}
    return done, running, [c for c in cells if c not in done and c not in running]


def check_no_slurm_jobs(out, cells):
    """The local launchers on an OUT whose unfinished cells were submitted to Slurm: refused while a job may
    still run them (two trainings in one run folder; the trainer's lock holds only where the file system's
    locks do)."""
    submitted, states = recorded_slurm_states(out, cells)
    for cell, job_id in submitted.items():
        state = states.get(job_id)
        if state is None or state in ACTIVE:
            raise SystemExit(f"error: {out}: cell {cell_name(cell)} was submitted to Slurm as job {job_id}"
                             + (f", which is {state}" if state else ", which this machine cannot ask about (no sacct)")
                             + f"; rerun with --launcher slurm to wait for it, or remove {Path(out) / RECORD} once "
                             "it has ended")


def submit(args, out, cells, options):
    """One job array of the cells; returns {cell: job} and adds them to OUT/jobs.json."""
    import submitit
    slurm = args.launcher == "slurm"
    executor = submitit.AutoExecutor(folder=Path(out) / "jobs" / "%j", cluster="slurm" if slurm else "local")
    executor.update_parameters(**executor_parameters(options, args.launcher))
    where = [{}] * len(cells) if slurm else job_slots(len(cells))  # Slurm's jobs: the environment Slurm gives
    try:
        with executor.batch():
            jobs = [executor.submit(CellJob(cell, args, slot, options.get("gpus_per_task", 1)))
                    for cell, slot in zip(cells, where)]
    except Exception as e:  # sbatch's own refusal (an unknown partition or account, a limit) as its one line
        raise SystemExit(f"error: submitting {len(cells)} cell{'s' * (len(cells) != 1)} failed: "
                         f"{last_line(e, type(e).__name__)}") from None
    record = read_record(out)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    record.update({cell_key(c): {"launcher": args.launcher, "job_id": j.job_id, "submitted": stamp}
                   for c, j in zip(cells, jobs)})
    write_record(out, record)
    return dict(zip(cells, jobs))


def why(job):
    """A failed job's own last word: the cell's error when its Python raised, else what the scheduler did."""
    if job.paths.result_pickle.exists():
        try:
            error = job.exception()
        except Exception as e:  # an unreadable result is a reason too
            error = e
        if error is not None:
            return last_line(error, type(error).__name__)
    return "killed by the scheduler or the node (no result)"


def wait(out, jobs, launcher):
    """Until every job has ended: each cell reported as it finishes, or as failed (its job ended without its
    metrics); returns the failed cells."""
    pending, failed = dict(jobs), []
    try:
        while pending:
            for cell, job in list(pending.items()):
                if not job.done():  # its metrics may be written while it still finishes the cell
                    continue
                if metrics_file(out, cell).is_file():
                    print(f"[{cell_name(cell)}] finished (job {job.job_id})", flush=True)
                else:
                    failed.append(cell)
                    print(f"[{cell_name(cell)}] job {job.job_id} ended ({job.state}) without the cell's metrics: "
                          f"{why(job)}; see {cell_path(out, cell) / 'sweep.log'} and {job.paths.stderr}", flush=True)
                del pending[cell]
            if pending:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        goes_on = "go on" if launcher == "slurm" else "stop with this process"
        raise SystemExit(f"stopped waiting for {len(pending)} jobs; they {goes_on}. Rerun the same command to "
                         "wait again (finished cells are kept), or add --report_only for what has finished") from None
    return failed


def run_jobs(args, out, cells, options):
    """The cluster launchers' sweep: submit what is unfinished and not running, then (unless --detach) wait
    for every job. Returns the finished cells and the failed ones, or None when detached."""
    done, running, to_submit = sort_cells(out, cells, args.launcher)
    print(f"{len(done)} of {len(cells)} cells finished before, {len(running)} still queued or running as "
          f"Slurm jobs, {len(to_submit)} to submit", flush=True)
    jobs = submit(args, out, to_submit, options) if to_submit else {}
    if jobs:
        ids = sorted({j.job_id.split("_")[0] for j in jobs.values()})
        print(f"submitted {len(jobs)} cell{'s' * (len(jobs) != 1)} as job {', '.join(ids)} ({args.launcher}); "
              f"their logs: {Path(out) / 'jobs'}/<job id>/, each cell's own: <cell>/sweep.log", flush=True)
    if args.detach:
        print("detached: rerun the same command (without --detach) to wait for the jobs and write the report, "
              "or with --report_only for the cells finished so far", flush=True)
        return None
    failed = wait(out, {**running, **jobs}, args.launcher)
    return finished(out, cells), failed
