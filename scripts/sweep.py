"""Train, generate and evaluate a grid of concepts x methods; one process per GPU; resumable.

    python scripts/sweep.py --dreambench ../shared/datasets/dreambooth --subjects dog,backpack \
        --methods attndreambooth,baselines/textual_inversion,baselines/dreambooth,baselines/ti_db \
        --out sweeps/dreambench --num_images 4

    python scripts/sweep.py --concepts toy=data/sample_toy:toy --methods attndreambooth,ablations/no_reg \
        --set model.pretrained=tiny --set data.resolution=64 --clip tiny --dino tiny --out sweeps/tiny

    python scripts/sweep.py --world shapes --out sweeps/shapes            # the paper's comparison, measured
    python scripts/sweep.py --world shapes --out sweeps/shapes_quick --quick

A method is a config name under configs/ ("attndreambooth", "baselines/dreambooth", "ablations/no_stage2",
or a path). Each cell (concept, method[, seed]) lives in OUT/<concept>/<method>/[seed_N/] as run/, samples/
and eval/; a cell whose eval/metrics.json exists is skipped, and an interrupted training resumes (with the
options OUT/protocol.json records: a rerun measuring otherwise, e.g. --quick, is refused). Cells run
in parallel, one per visible GPU (CUDA_VISIBLE_DEVICES, a subprocess each); on a CPU one at a time in this
process, or --jobs N at once (a subprocess each, the cores shared out: small models use two cores badly,
so two 1-thread trainings did 1.7x the work of one 2-thread training). Cells go seed by seed, so an
interrupted sweep leaves whole seeds. The gathered table, sweep.json and the identity-vs-text scatter
(one point per method) land in OUT; with --world shapes: comparison.md/.json (mean and 95 % CI over
concepts x seeds, AttnDreamBooth's paired differences to each method, per-concept means), scatter.png
with the intervals, grid.png (samples and [V]'s attention), and the base model's reference row.
"""
import argparse
import concurrent.futures
import json
import os
import queue
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from attndreambooth.bench import dreambench
from sweep_checks import cell_dir, check_cells, check_protocol, hold_out, method_config, parse_concepts


def scaled_steps(method, scale):
    """`stages.<name>.steps=...` overrides that scale every enabled stage of a method (the quick mode)."""
    from attndreambooth.config.loading import load_config
    cfg = load_config(method_config(method), ["data.instance_dir=.", "data.category=x"], check=False)
    return [f"stages.{name}.steps={max(1, round(st.steps * scale))}" for name, st in cfg.stages.items() if st.enabled]


def cell_commands(concept, folder, category, method, seed, args, cell):
    """The cell's (script, argv) steps: train (not for the reference), generate, evaluate."""
    world = args.world == "shapes"
    prompts = (Path(args.out) / "prompts" / f"{concept}.txt" if world
               else args.prompt_file or dreambench.prompt_file(category))
    infer = ["--prompt_file", prompts, "--num_images", args.num_images, "--out", cell / "samples",
             *(["--attention_maps", "--steps", args.sampler_steps] if world else []), *args.infer_args.split()]
    evaluate = (["--world", "shapes", "--concept", concept] if world
                else ["--real", folder, "--clip", args.clip, "--dino", args.dino])
    score = ("scripts/evaluate.py", ["--samples", cell / "samples", *evaluate, "--name", method,
                                     "--out", cell / "eval"])
    if method == "reference":  # the base model alone, `{}` the category word
        return [("infer.py", ["--base", args.base_model, "--category", category, *infer]), score]
    train = ["--config", method_config(method), f"data.instance_dir={folder}", f"data.category={category}",
             f"output_dir={cell / 'run'}", *args.set]
    if seed is not None:
        train.append(f"runtime.seed={seed}")
    if args.step_scale != 1:
        train += scaled_steps(method, args.step_scale)
    return [("train_attndreambooth.py", train), ("infer.py", [cell / "run", *infer]), score]


def call_in_process(script, argv, log):
    """Run a script's main(argv) in this process (a CPU saves each subprocess's seconds of imports); its
    output goes to `log`; a failure or sys.exit(message) raises."""
    import contextlib
    import importlib.util
    import logging

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


def slots(args):
    """Where cells run: one slot per GPU (its CUDA_VISIBLE_DEVICES), else --jobs CPU slots; a slot is the
    environment of its subprocesses, None for this process (one CPU job: no import cost per script)."""
    gpus = ([int(g) for g in args.gpus.split(",")] if args.gpus else list(range(torch.cuda.device_count())))
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus]
    if args.jobs == 1:
        return [None]
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * args.jobs


def run_cell(concept, folder, category, method, seed, args, slot):
    """Train, generate, evaluate one cell (in subprocesses with the slot's environment, or in this process);
    returns its metrics. A cell whose eval/metrics.json exists is skipped; an interrupted training resumes."""
    cell = cell_dir(args.out, concept, method, seed)
    metrics = cell / "eval" / "metrics.json"
    name = f"{concept} / {method}" + ("" if seed is None else f" / seed {seed}")
    if metrics.is_file():
        print(f"[{name}] done before: skipped", flush=True)
        return json.loads(metrics.read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(slot or {}))
    cell.mkdir(parents=True, exist_ok=True)
    with open(cell / "sweep.log", "a") as log:
        for script, argv in cell_commands(concept, folder, category, method, seed, args, cell):
            print(f"[{name}] {Path(script).name}", flush=True)
            try:
                if slot is None:
                    call_in_process(script, argv, log)
                elif subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], env=env, cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT).returncode:
                    raise RuntimeError("exit status != 0")
            except Exception as e:
                raise RuntimeError(f"{name}: {Path(script).name} failed ({e}); see {cell / 'sweep.log'}") from None
    return json.loads(metrics.read_text())


def gather_world(results, out, cells):
    """The world's report (attndreambooth.bench.shapes.bench.write_report) from the cells' metrics and, for the
    grid, the samples of the first seed."""
    from attndreambooth.bench.shapes.bench import REFERENCE, write_report
    name = lambda m: REFERENCE if m == "reference" else m.split("/")[-1]  # noqa: E731
    first_seed = min((seed for *_, seed in cells if seed is not None), default=None)
    samples = {(c, name(m)): cell_dir(out, c, m, seed) / "samples"
               for c, _, _, m, seed in cells if seed in (first_seed, None)}
    return write_report({(c, name(m), seed): r["overall"] for (c, m, seed), r in results.items()}, out, samples)


def parse_seeds(parser, text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        parser.error(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", default="", help="name=folder:category,... (your own concepts); with --world: "
                   "names of the world's concepts (default: all)")
    p.add_argument("--dreambench", help="the DreamBooth data set folder (with prompts_and_classes.txt)")
    p.add_argument("--subjects", default="", help="DreamBench subjects, e.g. dog,backpack")
    p.add_argument("--world", choices=["shapes"], help="the shapes world: its concepts, held-out prompts, exact "
                   "metrics, every method of configs/shapes/ and the base model's reference")
    p.add_argument("--methods", help="config names, comma-separated (default: attndreambooth; with --world: all)")
    p.add_argument("--seeds", default="", help="training seeds, comma-separated (with --world default 0,1,2)")
    p.add_argument("--out", required=True)
    p.add_argument("--num_images", type=int, default=4, help="images per prompt (DreamBench: 4)")
    p.add_argument("--num_prompts", type=int, default=20, help="with --world: held-out prompts per concept")
    p.add_argument("--sampler_steps", type=int, default=25, help="with --world: sampler steps per image")
    p.add_argument("--base_model", default=str(ROOT / "models" / "shapes"), help="with --world: the reference's model")
    p.add_argument("--step_scale", type=float, default=1.0, help="multiply every stage's steps (a quick look)")
    p.add_argument("--quick", action="store_true", help="with --world: one concept, one seed, the four main "
                   "methods, 6 prompts x 2 images, a quarter of the steps (a few minutes on a CPU)")
    p.add_argument("--prompt_file", help="default: DreamBench live or object prompts by category")
    p.add_argument("--set", action="append", default=[], help="a key=value for every training (repeatable)")
    p.add_argument("--infer_args", default="", help="extra infer.py arguments, e.g. '--steps 25'")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32")
    p.add_argument("--dino", default="facebook/dino-vits16")
    p.add_argument("--gpus", help="GPU indices to use (default: all visible; none on a CPU machine)")
    p.add_argument("--jobs", type=int, default=1, help="without a GPU: cells at once, the cores shared out")
    p.add_argument("--report_only", action="store_true", help="train nothing: gather the cells finished so far "
                   "(of a sweep stopped or still running) and say how many are missing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 or more")
    out = Path(args.out)
    if args.world:
        from attndreambooth.bench.shapes.bench import METHODS, QUICK_METHODS, world_cells
        if args.quick:
            args.concepts = args.concepts or "checker_star"
            args.seeds, args.num_prompts, args.num_images = args.seeds or "0", 6, 2
            args.step_scale = 0.25 if args.step_scale == 1 else args.step_scale
        args.methods = args.methods or ",".join(f"shapes/{m}" for m in (QUICK_METHODS if args.quick else METHODS))
        args.seeds = parse_seeds(p, args.seeds or "0,1,2")
        for m in args.methods.split(","):
            method_config(m)
        from attndreambooth.bench.shapes.scene import CONCEPTS
        concepts = list(filter(None, args.concepts.split(","))) or list(CONCEPTS)
        if unknown := [c for c in concepts if c not in CONCEPTS]:
            raise SystemExit(f"error: --concepts {unknown}: not concepts of the shapes world ({', '.join(CONCEPTS)})")
        cells = world_cells(concepts, args.methods.split(","), args.seeds)
    else:
        concepts = parse_concepts(args.concepts)
        if args.dreambench:
            concepts.update(dreambench.concepts(args.dreambench, list(filter(None, args.subjects.split(",")))))
        if not concepts:
            raise SystemExit("error: give --concepts or --dreambench with --subjects (or --world shapes)")
        methods = (args.methods or "attndreambooth").split(",")
        for m in methods:
            method_config(m)
        seeds = parse_seeds(p, args.seeds) if args.seeds else [None]
        cells = [(c, folder, cat, m, seed) for seed in seeds for c, (folder, cat) in concepts.items() for m in methods]
    if not args.report_only:  # every cell's training config, and --out, before anything is written
        check_cells(args, cells)
    protocol = check_protocol(args)  # a refusal writes nothing, not even the lock
    lock = None if args.report_only else hold_out(out)  # a report reads; it may run beside a sweep
    try:
        return sweep(args, out, concepts, cells, protocol)
    finally:
        if lock is not None:
            lock.close()


def sweep(args, out, concepts, cells, protocol):
    """Run (or with --report_only, read back) the cells, then write the report."""
    if args.report_only:
        done = [(c, folder, cat, m, seed) for c, folder, cat, m, seed in cells
                if (cell_dir(out, c, m, seed) / "eval" / "metrics.json").is_file()]
        if not done:
            raise SystemExit(f"error: --report_only: no finished cell in {out} for these concepts, methods and seeds")
        print(f"{len(done)} of {len(cells)} cells finished; the report covers those", flush=True)
        cells = done  # each read back below, none run
    else:  # OUT is this process's now (its lock): record what the cells are measured with
        (out / "protocol.json").write_text(json.dumps(protocol, indent=1) + "\n")
        if args.world:
            from attndreambooth.bench.shapes.bench import write_prompts
            write_prompts(out, concepts, args.num_prompts)
    where = slots(args)
    free = queue.Queue()
    for slot in where:
        free.put(slot)

    def task(cell):
        slot = free.get()
        try:
            return run_cell(*cell, args, slot)
        finally:
            free.put(slot)

    out.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(len(where)) as pool:
        results = dict(zip([(c, m, seed) for c, _, _, m, seed in cells], pool.map(task, cells)))
    if args.world:
        text = gather_world(results, out, cells)
    else:
        text = dreambench.write_table({(c, m if seed is None else f"{m} seed {seed}"): r for (c, m, seed), r in results.items()}, out)
    print(text)
    return results


if __name__ == "__main__":
    main()
