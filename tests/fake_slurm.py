"""A fake Slurm on PATH for the sweep's cluster launcher tests: `sbatch FILE` records the submission script
and answers "Submitted batch job N" (100, 101, ...), or refuses as a real sbatch does when FAKE_SLURM/refuse
holds a message; `sacct` answers the state of each asked job (each task of an array: ID_0, ID_1, ...) from
FAKE_SLURM/states ("ID STATE" lines), else FAKE_SLURM/default_state, else PENDING; `srun CMD...` runs CMD
here (one node), `scontrol show hostnames` answers 127.0.0.1; squeue and scancel do nothing. No job runs by
itself: a test runs a submitted cell from the pickle submitit wrote."""
import os
import stat
import sys
from pathlib import Path

TOOL = '''#!{python}
import json, re, sys
from pathlib import Path
home = Path({home!r})
name = Path(sys.argv[0]).name
with open(home / "calls.log", "a") as log:
    log.write(" ".join([name, *sys.argv[1:]]) + "\\n")
if name == "sbatch":
    if (home / "refuse").is_file():
        sys.exit((home / "refuse").read_text().strip())
    n = len(list(home.glob("sbatch_*.sh")))
    (home / f"sbatch_{{100 + n}}.sh").write_text(Path(sys.argv[-1]).read_text())
    print(f"Submitted batch job {{100 + n}}")
elif name == "srun":  # one node: run the step here
    import os
    os.execvp(sys.argv[1], sys.argv[1:])
elif name == "scontrol":  # `scontrol show hostnames LIST`: this machine
    print("127.0.0.1")
elif name == "sacct":
    states = dict(l.split() for l in (home / "states").read_text().splitlines() if l.strip()) \\
        if (home / "states").is_file() else {{}}
    default = (home / "default_state").read_text().strip() if (home / "default_state").is_file() else "PENDING"
    asked = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
    print("JobID|State|NodeList")
    for job in asked:
        script = home / f"sbatch_{{job}}.sh"
        array = re.search(r"--array=(\\d+)-(\\d+)", script.read_text()) if script.is_file() else None
        tasks = [f"{{job}}_{{i}}" for i in range(int(array[1]), int(array[2]) + 1)] if array else [job]
        for task in tasks:
            print(f"{{task}}|{{states.get(task, default)}}|node1")
'''


def install(home):
    """The fake commands in home/bin; returns that folder (put it first on PATH)."""
    home = Path(home)
    (home / "bin").mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "sacct", "srun", "scontrol", "squeue", "scancel"):
        path = home / "bin" / name
        path.write_text(TOOL.format(python=sys.executable, home=str(home)))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return home / "bin"


def calls(home, tool):
    log = Path(home) / "calls.log"
    return [line.split()[1:] for line in (log.read_text().splitlines() if log.is_file() else [])
            if line.split()[0] == tool]


def set_states(home, **states):
    """Job states as sacct will report them, e.g. set_states(home, **{"100_0": "COMPLETED"})."""
    (Path(home) / "states").write_text("".join(f"{k} {v}\n" for k, v in states.items()))


if __name__ == "__main__":
    print(install(os.environ.get("FAKE_SLURM", sys.argv[1])))
