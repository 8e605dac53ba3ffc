"""The cluster launchers' options (--launcher slurm, or submitit-local to try the jobs on this machine): from
the command line over a small YAML (--cluster_config), each checked before anything is submitted, and turned
into submitit's executor parameters (one job-array task per cell)."""
import re
from pathlib import Path

LAUNCHERS = ("local", "slurm", "submitit-local")
DEFAULT_TIME = 240  # minutes a cell's job may run; a timed-out cell is requeued and its training resumes
NAMES = {"partition": "a partition's name", "account": "an account's name", "qos": "a QOS name",
         "constraint": "a node feature expression"}
COUNTS = {"gpus_per_task": "GPUs each cell trains on", "cpus_per_task": "cores per cell",
          "mem_gb": "GB of memory per cell", "array_parallelism": "cells running at once"}
OPTIONS = (*NAMES, *COUNTS, "time", "setup", "sbatch")
LOCAL_OPTIONS = ("time", "setup")  # what submitit's local executor has; the rest are Slurm's
OWN_FLAGS = {"partition", "account", "qos", "constraint", "gpus_per_node", "gpus_per_task", "gres", "cpus_per_task",
             "mem", "time", "array", "nodes", "ntasks_per_node", "job_name", "output", "error", "signal",
             "open_mode", "wckey"}  # set by an option above or by submitit itself


def add_arguments(parser):
    group = parser.add_argument_group("cluster launchers (--launcher slurm | submitit-local, through submitit)")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local", help="local: this machine's GPUs or "
                       "--jobs CPU slots (default); slurm: one job-array task per unfinished cell")
    group.add_argument("--cluster_config", help="a YAML of the options below (the command line wins)")
    for key in NAMES:
        group.add_argument(f"--{key}", help=f"Slurm: {NAMES[key]}")
    for key in COUNTS:
        default = " (default 1)" if key == "gpus_per_task" else ""
        group.add_argument(f"--{key}", help=f"Slurm: {COUNTS[key]}{default}")
    group.add_argument("--time", help=f"a cell's time limit: minutes or [D-]HH:MM[:SS] (default {DEFAULT_TIME})")
    group.add_argument("--setup", action="append", help="a shell line the job runs first, e.g. 'module load cuda' "
                       "(repeatable)")
    group.add_argument("--sbatch", action="append", help="another sbatch option as KEY=VALUE, e.g. mail-type=END, "
                       "or a flag's KEY, e.g. exclusive (repeatable)")
    group.add_argument("--detach", action="store_true", help="slurm: submit and return; rerun the same command "
                       "to wait for the jobs and report")
    group.add_argument("--dry_run", action="store_true",
                       help="print the cells and the job parameters; submit, train and write nothing")


def minutes(value):
    """A Slurm time limit as whole minutes (seconds round up), in sbatch's formats: minutes, minutes:seconds,
    hours:minutes:seconds, days-hours[:minutes[:seconds]]; None when it is none of them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    days, dash, clock = str(value).strip().rpartition("-")
    parts = clock.split(":")
    if len(parts) > 3 or not all(p.isdigit() for p in parts) or (dash and not days.isdigit()):
        return None
    n = [int(p) for p in parts]
    if days:
        hours, mins, secs = (n + [0, 0])[:3]
    else:
        hours, mins, secs = n if len(n) == 3 else (0, n[0], n[1] if len(n) == 2 else 0)  # m, m:s, h:m:s
    return int(days or 0) * 1440 + hours * 60 + mins + (secs > 0)


def checked(key, value, where):
    """One option's value, or SystemExit naming where it came from and what to give."""
    def refuse(what):
        raise SystemExit(f"error: {where}: {value!r}: {what}")
    if key in NAMES:
        if not isinstance(value, str) or not value.strip() or re.search(r"\s", value):
            refuse(f"give {NAMES[key]} (one word)")
        return value
    if key in COUNTS:
        number = value if isinstance(value, int) and not isinstance(value, bool) else (
            int(value) if isinstance(value, str) and value.strip().isdigit() else None)
        if number is None or number < 1:
            refuse(f"give a whole number of 1 or more ({COUNTS[key]})")
        return number
    if key == "time":
        total = minutes(value)
        if total is None or total < 1:
            refuse("give a positive time limit: minutes (240) or [D-]HH:MM[:SS] (4:00:00, 1-00:00)")
        return total
    if key == "setup":
        lines = [value] if isinstance(value, str) else value
        if not isinstance(lines, list) or not all(isinstance(x, str) and x.strip() for x in lines):
            refuse("give shell lines (a list of strings)")
        return lines
    return sbatch_options(value, where, refuse)


def sbatch_options(value, where, refuse):
    """--sbatch KEY=VALUE / FLAG items (a mapping in the YAML) as submitit's additional parameters."""
    items = value.items() if isinstance(value, dict) else None
    if items is None and isinstance(value, list) and all(isinstance(x, str) and x.strip() for x in value):
        items = [x.split("=", 1) if "=" in x else (x, True) for x in value]
    if items is None:
        refuse("give sbatch options as KEY=VALUE or a flag's KEY (a mapping in the YAML)")
    extra = {}
    for flag, setting in items:
        name = str(flag).lstrip("-").replace("-", "_")
        unusable = setting is False or setting is None or isinstance(setting, (dict, list))  # 0 is a value
        if unusable or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise SystemExit(f"error: {where}: {flag}={setting!r}: give an sbatch option's long name and a value")
        if name in OWN_FLAGS:
            own = name if name in OPTIONS else "gpus_per_task, --time, ..."
            raise SystemExit(f"error: {where}: {flag}: set by the sweep itself or by its own option (--{own}); "
                             "remove it here")
        extra[name] = setting
    return extra


def read_config(path):
    """--cluster_config: a YAML mapping of OPTIONS."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise SystemExit(f"error: --cluster_config {path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: --cluster_config {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: --cluster_config {path}: give a mapping of options, e.g. partition: gpu")
    if unknown := [k for k in data if k not in OPTIONS]:
        raise SystemExit(f"error: --cluster_config {path}: unknown option {unknown[0]!r} "
                         f"(options: {', '.join(OPTIONS)})")
    return {k: checked(k, v, f"--cluster_config {path}: {k}") for k, v in data.items()}


def cluster_options(args):
    """The options for args.launcher, the command line over --cluster_config, each checked; an option that the
    launcher would ignore is refused (a local sweep given --partition would say nothing and run here)."""
    options = read_config(args.cluster_config) if args.cluster_config else {}
    named = {k: f"--cluster_config {args.cluster_config}: {k}" for k in options}  # where each came from
    for key in OPTIONS:
        if getattr(args, key) is not None:
            options[key], named[key] = checked(key, getattr(args, key), f"--{key}"), f"--{key}"
    if args.detach:
        named["detach"] = "--detach"
    if args.launcher == "local" and (args.cluster_config or named):
        raise SystemExit(f"error: {'--cluster_config' if args.cluster_config else next(iter(named.values()))} is "
                         "an option of --launcher slurm (or submitit-local); the local launcher runs the cells here")
    if args.launcher == "submitit-local" and (slurm_only := [w for k, w in named.items() if k not in LOCAL_OPTIONS]):
        raise SystemExit(f"error: {slurm_only[0]}: a Slurm option; --launcher submitit-local runs the jobs on this "
                         "machine, as children of this process (its options: time, setup)")
    if args.launcher != "local":
        for key, value in (("jobs", args.jobs), ("gpus", args.gpus)):
            if value is not None:
                raise SystemExit(f"error: --{key} is an option of --launcher local; with --launcher {args.launcher} "
                                 "each cell is a job (--array_parallelism limits how many run at once)")
    return {"time": DEFAULT_TIME, **({"gpus_per_task": 1} if args.launcher == "slurm" else {}), **options}


def executor_parameters(options, launcher):
    """submitit.AutoExecutor.update_parameters(...) for a cell's job: one task on one node with the cell's GPUs."""
    params = {"timeout_min": options["time"], "name": "attndreambooth-sweep"}
    if launcher == "submitit-local":
        return {**params, **({"local_setup": options["setup"]} if "setup" in options else {})}
    params.update(tasks_per_node=1, nodes=1, gpus_per_node=options["gpus_per_task"])
    params.update({k: options[k] for k in ("cpus_per_task", "mem_gb") if k in options})
    params.update({f"slurm_{k}": options[k] for k in (*NAMES, "array_parallelism", "setup") if k in options})
    if "sbatch" in options:
        params["slurm_additional_parameters"] = options["sbatch"]
    return params
