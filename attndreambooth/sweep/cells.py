"""One cell of a sweep (concept, method[, seed]): its folder, the commands that train, sample and score it,
and running them, in this process, in subprocesses, or as a cluster job (`CellJob`, which submitit pickles)."""
import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from attndreambooth.machine import machine
from attndreambooth.sweep import dreambench

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the scripts a cell runs and the configs it names
UNTRAINED = ("reference", "floor")  # the base model's cells (the world's category word and best caption)


def method_config(name):
    """A method's config file: a name under configs/ (e.g. baselines/dreambooth) or a .yaml path."""
    path = Path(name) if name.endswith(".yaml") else ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: method {name!r}: no config {path}")
    return path


def cell_dir(out, concept, method, seed):
    """OUT/<concept>/<method>/[seed_N/]: one cell's run/, samples/ and eval/."""
    cell = Path(out) / concept / method.replace("/", "_")
    return cell / f"seed_{seed}" if seed is not None else cell


def cell_name(cell):
    """A cell (concept, photos, category, method, seed) as the logs name it."""
    concept, _, _, method, seed = cell
    return f"{concept} / {method}" + ("" if seed is None else f" / seed {seed}")


def cell_path(out, cell):
    concept, _, _, method, seed = cell
    return cell_dir(out, concept, method, seed)


def metrics_file(out, cell):
    """What marks a cell finished: written last, by its evaluation."""
    return cell_path(out, cell) / "eval" / "metrics.json"


def finished(out, cells):
    """The cells of `cells` whose metrics exist."""
    return [c for c in cells if metrics_file(out, c).is_file()]


def method_settings(method):
    """A method's config as its file gives it (the concept filled in with placeholders)."""
    from attndreambooth.config.loading import load_config
    return load_config(method_config(method), ["data.instance_dir=.", "data.category=x", "output_dir=."], check=False)


def scaled_steps(method, scale):
    """`stages.<name>.steps=...` overrides that scale every enabled stage of a method (the quick mode)."""
    cfg = method_settings(method)
    return [f"stages.{name}.steps={max(1, round(st.steps * scale))}" for name, st in cfg.stages.items() if st.enabled]


def shared_class_images(method, out, category):
    """A method with prior preservation takes its class images from OUT/class_images/<category>/, made once by
    the base model for all its cells (unless its config names a folder)."""
    prior = method_settings(method).prior
    return [f"prior.class_dir={Path(out) / 'class_images' / category}"] if prior.enabled and not prior.class_dir else []


def world_model(method, base_model):
    """A world's methods train from its base model: `model.pretrained=...` where the method's config names
    another (a config that already names it is left as written, so the runs it made resume as before)."""
    named = Path(method_settings(method).model.pretrained)
    same = (ROOT / named if not named.is_absolute() else named).resolve() == Path(base_model).resolve()
    return [] if same else [f"model.pretrained={base_model}"]


def cell_commands(concept, folder, category, method, seed, args, cell, samples="samples", evaluation="eval"):
    """The cell's (script, argv) steps: train (not for the base model's cells), generate into cell/`samples`,
    evaluate into cell/`evaluation`."""
    world = args.world is not None
    prompts = (Path(args.out) / "prompts" / f"{concept}.txt" if world
               else args.prompt_file or dreambench.prompt_file(category))
    world_infer = ["--attention_maps", "--steps", args.sampler_steps, "--batch_size", args.sampler_batch]
    infer = ["--prompt_file", prompts, "--num_images", args.num_images, "--out", cell / samples,
             *(world_infer if world else []), *args.infer_args.split()]
    evaluate = (["--world", args.world, "--concept", concept] if world
                else ["--real", folder, "--clip", args.clip, "--dino", args.dino])
    score = ("scripts/evaluate.py", ["--samples", cell / samples, *evaluate, "--name", method,
                                     "--out", cell / evaluation])
    if method == "reference":  # the base model alone, `{}` the category word
        return [("infer.py", ["--base", args.base_model, "--category", category, *infer]), score]
    if method == "floor":  # the base model, `{}` its best description (bench.write_floor_captions)
        caption = json.loads((Path(args.out) / "floor_captions.json").read_text())[concept]["caption"]
        return [("infer.py", ["--base", args.base_model, "--category", caption, *infer]), score]
    train = ["--config", method_config(method), f"data.instance_dir={folder}", f"data.category={category}",
             f"output_dir={cell / 'run'}", *shared_class_images(method, args.out, category),
             *(world_model(method, args.base_model) if world else []), *args.set]
    if seed is not None:
        train.append(f"runtime.seed={seed}")
    if args.step_scale != 1:
        train += scaled_steps(method, args.step_scale)
    return [("train_attndreambooth.py", train), ("infer.py", [cell / "run", *infer]), score]


def call_in_process(script, argv, log):
    """Run a script's main(argv) in this process (a CPU saves each subprocess's seconds of imports); its
    output goes to `log`; a failure or sys.exit(message) raises."""
    from accelerate.state import AcceleratorState
    spec = importlib.util.spec_from_file_location(Path(script).stem.replace(".", "_"), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    AcceleratorState._reset_state(True)  # each training builds its own Accelerator, as a fresh process would
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # into this cell's log
            module.main([str(a) for a in argv])
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(str(e.code)) from None
    finally:
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # the console again


def command_line(script, argv, processes):
    """A script's subprocess command; a training on several GPUs of one job goes through torchrun."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 and script == "train_attndreambooth.py" else [sys.executable])
    return [*launch, str(ROOT / script), *map(str, argv)]


def resumes_a_run(run):
    """Whether a training into `run` continues an earlier attempt: a finished run, or one with a checkpoint."""
    from attndreambooth.trainer.checkpoint import Checkpointer
    return (Path(run) / "finished.json").is_file() or bool(Checkpointer(run, keep=0).folders())


CHILDREN = set()  # the scripts running as subprocesses now: a Ctrl-C or SIGTERM of the sweep is passed on


def run_child(command, env, log):
    """A cell's script as a subprocess; returns its exit status."""
    child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    CHILDREN.add(child)
    try:
        return child.wait()
    finally:
        CHILDREN.discard(child)


def stop_children(signum):
    """Pass a signal on to every running script (each training then checkpoints and says so in its log)."""
    for child in list(CHILDREN):
        if child.poll() is None:
            child.send_signal(signum)


def run_cell(concept, folder, category, method, seed, args, slot, processes=1):
    """Train, generate, evaluate one cell (in subprocesses with the slot's environment, or with slot None in
    this process); returns its metrics. A cell whose eval/metrics.json exists is skipped; an interrupted
    training resumes from its checkpoint."""
    this = (concept, folder, category, method, seed)
    cell, metrics, name = cell_path(args.out, this), metrics_file(args.out, this), cell_name(this)
    if metrics.is_file():
        print(f"[{name}] done before: skipped", flush=True)
        return json.loads(metrics.read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(slot or {}))
    cell.mkdir(parents=True, exist_ok=True)
    seconds = {}  # what the cell costs, by part (this attempt's; a resumed training counts what it redid)
    resumed = resumes_a_run(cell / "run")  # then what it times is not what a cell costs
    with open(cell / "sweep.log", "a") as log:
        for script, argv in cell_commands(concept, folder, category, method, seed, args, cell):
            print(f"[{name}] {Path(script).name}", flush=True)
            start = time.perf_counter()
            try:
                if slot is None:
                    call_in_process(script, argv, log)
                elif run_child(command_line(script, argv, processes), env, log):  # in this cwd: relative
                    raise RuntimeError("exit status != 0")  # --out and photos mean the same
            except Exception as e:
                raise RuntimeError(f"{name}: {Path(script).name} failed ({e}); see {cell / 'sweep.log'}") from None
            seconds[Path(script).stem] = round(time.perf_counter() - start, 2)
    (cell / "timings.json").write_text(json.dumps(dict(seconds, processes="this one" if slot is None else
                                                       "one per script", resumed=resumed, machine=machine()),
                                                  indent=1) + "\n")
    return json.loads(metrics.read_text())


class CellJob:
    """One cell as a cluster job: submitit pickles it and calls it on the node, where the cell runs in
    subprocesses with the job's environment (its GPUs: a training on several goes through torchrun). On a
    timeout or a preemption submitit calls `checkpoint` and requeues the same call; the training then resumes
    from the cell's own checkpoint."""

    def __init__(self, cell, args, slot, processes):
        self.cell, self.args, self.slot, self.processes = cell, args, slot, processes
        self.cwd = os.getcwd()  # relative paths (--out, photo folders) mean what they meant to the submitter

    def __call__(self):
        os.chdir(self.cwd)
        return run_cell(*self.cell, self.args, self.slot, self.processes)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission  # in the job: submitit is what runs it
        return DelayedSubmission(self, *args, **kwargs)
