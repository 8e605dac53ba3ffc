"""Train, generate and evaluate a grid of concepts x methods; one process per GPU; resumable.

    python scripts/sweep.py --dreambench ../shared/datasets/dreambooth --subjects dog,backpack \
        --methods attndreambooth,baselines/textual_inversion,baselines/dreambooth,baselines/ti_db \
        --out sweeps/dreambench --num_images 4

    python scripts/sweep.py --concepts toy=data/sample_toy:toy --methods attndreambooth,ablations/no_reg \
        --set model.pretrained=tiny --set data.resolution=64 --clip tiny --dino tiny --out sweeps/tiny

    python scripts/sweep.py --world shapes3 --out sweeps/shapes3         # the paper's comparison, measured
    python scripts/sweep.py --world shapes3 --out sweeps/shapes3_quick --quick
    python scripts/sweep.py --world shapes --out sweeps/shapes   # the first world's (models/shapes_v1), as published
    python scripts/sweep.py --dreambench ../dreambooth --subjects dog,cat --out sweeps/db \
        --launcher slurm --partition gpu --time 2:00:00 --array_parallelism 16   # a Slurm job array

A method is a config name under configs/ ("attndreambooth", "baselines/dreambooth", "ablations/no_stage2",
or a path). Each cell (concept, method[, seed]) lives in OUT/<concept>/<method>/[seed_N/] as run/, samples/
and eval/; a cell whose eval/metrics.json exists is skipped, and an interrupted training resumes (with the
options OUT/protocol.json records: a rerun measuring otherwise, e.g. --quick, is refused). Cells run
in parallel, one per visible GPU (CUDA_VISIBLE_DEVICES, a subprocess each); on a CPU one at a time in this
process, or --jobs N at once (N worker processes, the cores shared out: small models use two cores badly,
so two 1-thread trainings did 1.7x the work of one 2-thread training). Cells go seed by seed, so an
interrupted sweep leaves whole seeds. The gathered table, sweep.json and the identity-vs-text scatter
(one point per method) land in OUT; with --world: comparison.md/.json (mean and 95 % CI over
concepts x seeds, AttnDreamBooth's paired differences to each method, per-concept means), scatter.png
with the intervals, grid.png (samples and [V]'s attention), and the base model's reference row; --publish
copies the report and its record (worlds/record.py), from which it can be recomputed or the sweep finished.
With --launcher slurm each unfinished cell is a task of one job array (submitit); OUT/jobs.json records
them, and the same command run again waits for the running ones, resubmits those that failed, timed out or
were preempted (their trainings resume), and never a finished one (attndreambooth/sweep/jobs.py).
"""
import importlib.util
import json
import shutil
import signal
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # worlds/ and bench/ live beside the package

import torch

from attndreambooth.cli import Parser
from attndreambooth.sweep import dreambench
from attndreambooth.config.checks import folder_problem
from attndreambooth.sweep import cluster, jobs
from attndreambooth.sweep.cells import ROOT, cell_dir, cell_name, cell_path, finished, method_config, metrics_file
from attndreambooth.sweep.local import run_local, slots
from attndreambooth.sweep.checks import check_cells, check_protocol, hold_out, parse_concepts
from worlds import WORLDS, load as load_world


PUBLISHED = ("comparison.md", "comparison.json", "scatter.png", "grid.png", "protocol.json", "floor_captions.json",
             "vae_ceiling.json", "sampler_agreement.md", "sampler_agreement.json")  # the last two once tools/sampler_agreement.py ran


def report_name(method):
    from worlds.comparison import BASELINES
    return BASELINES.get(method, method.split("/")[-1])


def grid_samples(out, cells):
    """{(concept, method as the report names it): samples folder} of the first seed's cells, for grid.png."""
    first_seed = min((seed for *_, seed in cells if seed is not None), default=None)
    return {(c, report_name(m)): cell_dir(out, c, m, seed) / "samples"
            for c, _, _, m, seed in cells if seed in (first_seed, None)}


def gather_world(world, results, out, cells, base_model):
    """The world's report (worlds.comparison.write_report) from the cells' metrics, with the
    base model's VAE ceiling per concept and, for the grid, the samples of the first seed."""
    from worlds.comparison import write_report, write_vae_ceiling
    samples = grid_samples(out, cells)
    timings = {(c, report_name(m), seed): json.loads(path.read_text()) for c, _, _, m, seed in cells
               if (path := cell_dir(out, c, m, seed) / "timings.json").is_file()}
    ceiling = write_vae_ceiling(world, out, {c: photos for c, photos, *_ in cells}, base_model,
                                "cuda" if torch.cuda.is_available() else "cpu")
    return write_report({(c, report_name(m), seed): r["overall"] for (c, m, seed), r in results.items()}, out, samples,
                        timings, ceiling)


def unknown_words(world, model):
    """The words a model of the world has a token for (world.MODEL_WORDS) that this model's tokenizer
    (tokenizer/tokenizer.json, as the worlds save it) has not; none when it keeps its vocabulary otherwise."""
    path = Path(model) / "tokenizer" / "tokenizer.json"
    try:
        vocab = json.loads(path.read_text())["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [w for w in world.MODEL_WORDS if f"{w}</w>" not in vocab]


def parse_seeds(p, text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2")


def parser():
    p = Parser(description=__doc__)
    p.add_argument("--concepts", default="", help="name=folder:category,... (your own concepts); with --world: "
                   "names of the world's concepts (default: all)")
    p.add_argument("--dreambench", help="the DreamBooth data set folder (with prompts_and_classes.txt)")
    p.add_argument("--subjects", default="", help="DreamBench subjects, e.g. dog,backpack")
    p.add_argument("--world", choices=WORLDS, help="a world (shapes: the first shapes world; shapes3: the third): its "
                   "concepts, held-out prompts, exact metrics, every method of configs/shapes/ and the base model's "
                   "reference")
    p.add_argument("--methods", help="config names, comma-separated (default: attndreambooth; with --world: all)")
    p.add_argument("--seeds", default="", help="training seeds, comma-separated (with --world default 0,1,2)")
    p.add_argument("--out", required=True)
    p.add_argument("--num_images", type=int, default=4, help="images per prompt (DreamBench: 4)")
    p.add_argument("--num_prompts", type=int, default=20, help="with --world: held-out prompts per concept")
    p.add_argument("--sampler_steps", type=int, help="with --world: sampler steps per image (default: the "
                   "world's, world.SAMPLER_STEPS: 15 for shapes, 25 for shapes3)")
    p.add_argument("--sampler_batch", type=int, default=16, help="with --world: images per denoiser call, across "
                   "a cell's prompts (16: 1.3x faster per image than 4 on a CPU; more on a GPU)")
    p.add_argument("--base_model", help="with --world: the model every cell trains from and the reference samples "
                   "(default: the world's own: models/shapes for shapes3, models/shapes_v1 for shapes)")
    p.add_argument("--step_scale", type=float, default=1.0, help="multiply every stage's steps (a quick look)")
    p.add_argument("--quick", action="store_true", help="with --world: one concept, one seed, the four main "
                   "methods, 6 prompts x 2 images, a quarter of the steps (a few minutes on a CPU)")
    p.add_argument("--prompt_file", help="default: DreamBench live or object prompts by category")
    p.add_argument("--set", action="append", default=[], help="a key=value for every training (repeatable)")
    p.add_argument("--infer_args", default="", help="extra infer.py arguments, e.g. '--steps 25'")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32")
    p.add_argument("--dino", default="facebook/dino-vits16")
    p.add_argument("--gpus", help="GPU indices to use (default: all visible; none on a CPU machine)")
    p.add_argument("--jobs", type=int, help="without a GPU: cells at once, the cores shared out (default 1)")
    p.add_argument("--publish", help="with --world: also copy the report (comparison.md/.json, scatter.png, "
                   "grid.png, protocol.json, floor_captions.json, and sampler_agreement.md/.json once "
                   "tools/sampler_agreement.py has run) into this folder, e.g. docs/reports/shapes_results_r2, "
                   "and into its sweep/ what the report is computed from, laid out as --out (worlds/record.py: "
                   "--report_only --out FOLDER/sweep recomputes it; an --out holding a copy resumes the sweep)")
    p.add_argument("--report_only", action="store_true", help="train nothing: gather the cells finished so far "
                   "(of a sweep stopped or still running) and say how many are missing")
    cluster.add_arguments(p)
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    options = cluster.cluster_options(args)  # the launcher's options, each checked, before anything else
    if args.launcher != "local" and not (args.dry_run or args.report_only):  # those read; they submit nothing
        jobs.require_submitit(args.launcher)
        if args.launcher == "slurm":
            jobs.require_slurm()
    for name in ("jobs", "num_images", "num_prompts", "sampler_steps", "sampler_batch"):  # counts, before any cell
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: give 1 or more")
    if not 0 < args.step_scale < float("inf"):
        p.error(f"--step_scale {args.step_scale}: give a finite number above 0 (0.25: a quarter of every stage's steps)")
    if args.publish and not args.world:
        p.error("--publish copies a world's report; give it with --world (e.g. --world shapes)")
    if args.publish and (problem := folder_problem(Path(args.publish) / "sweep")):  # the report's folder and its record's
        raise SystemExit(f"error: --publish: {problem}")
    out = Path(args.out)
    world = load_world(args.world) if args.world else None
    # a sweep without a world records <repository>/models/shapes in its protocol, as it always has: a name only
    # (its cells train from their configs' models), kept so a rerun compares equal with what it recorded
    args.base_model = args.base_model or str(world.MODEL if world else ROOT / "models" / "shapes")
    if args.sampler_steps is None:
        args.sampler_steps = world.SAMPLER_STEPS if world else 15
    if world and not (Path(args.base_model) / "model_index.json").is_file():
        raise SystemExit(f"error: --base_model {args.base_model}: no model folder (no model_index.json); give the "
                         f"{args.world} world's base model (a folder `python -m worlds.{args.world} --out DIR` finished)")
    if world and (missing := unknown_words(world, args.base_model)):
        raise SystemExit(f"error: --base_model {args.base_model}: its tokenizer has no token for the {args.world} "
                         f"world's words {', '.join(missing)}: it is another world's model; give the {args.world} "
                         "world's own")
    if world:
        from worlds.comparison import METHODS, QUICK_METHODS, world_cells
        if args.quick:
            args.concepts = args.concepts or "checker_star"
            args.seeds, args.num_prompts, args.num_images = args.seeds or "0", 6, 2
            args.step_scale = 0.25 if args.step_scale == 1 else args.step_scale
        args.methods = args.methods or ",".join(f"shapes/{m}" for m in (QUICK_METHODS if args.quick else METHODS))
        args.seeds = parse_seeds(p, args.seeds or "0,1,2")
        for m in args.methods.split(","):
            method_config(m)
        concepts = list(filter(None, args.concepts.split(","))) or list(world.CONCEPTS)
        if unknown := [c for c in concepts if c not in world.CONCEPTS]:
            raise SystemExit(f"error: --concepts {unknown}: not concepts of the {args.world} world "
                             f"({', '.join(world.CONCEPTS)})")
        cells = world_cells(world, concepts, args.methods.split(","), args.seeds)
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
    if args.dry_run:
        return dry_run(args, out, cells, options)
    lock = None if args.report_only else hold_out(out)  # a report reads; it may run beside a sweep
    previous = signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: the cells' trainings keep their checkpoints
    try:
        return sweep(args, world, out, concepts, cells, protocol, options)
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; the cells that were training keep their last checkpoints (each "
                         "cell's sweep.log says where it stopped); run the same command to resume") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.close()


def interrupt(signum, frame):
    raise KeyboardInterrupt


def dry_run(args, out, cells, options):
    """--dry_run: each cell and whether it would run, and where: nothing submitted, trained or written."""
    done = finished(out, cells)
    if args.launcher != "slurm":  # refused as the real command refuses it: cells a Slurm job may still run
        jobs.check_no_slurm_jobs(out, cells)
    recorded, states = jobs.recorded_slurm_states(out, cells) if args.launcher == "slurm" else ({}, {})  # jobs.json
    running = {c for c, i in recorded.items() if states.get(i) in jobs.ACTIVE}
    for c in cells:
        if c in done:
            what = "finished"
        elif c in recorded:
            state = states.get(recorded[c]) or "state unknown here: no sacct"
            what = f"{'waited' if c in running else 'to run'} (Slurm job {recorded[c]}, {state})"
        else:
            what = "to run"
        print(f"{what:<8}  {cell_name(c)}  ({cell_path(out, c)})")
    todo = len(cells) - len(done) - len(running)
    if args.launcher == "local":
        where = slots(args)
        print(f"{todo} of {len(cells)} cells would run on this machine, {len(where)} at a time: {where}")
        return None
    print(f"{todo} of {len(cells)} cells would be submitted as one job array ({args.launcher}), {len(running)} "
          "waited for as running Slurm jobs, with submitit.AutoExecutor parameters:")
    for key, value in cluster.executor_parameters(options, args.launcher).items():
        print(f"  {key}: {value!r}")
    if importlib.util.find_spec("submitit") is None:
        print("submitit is not installed: pip install submitit before submitting")
    return None


def sweep(args, world, out, concepts, cells, protocol, options):
    """Run the cells (here, or as cluster jobs), or with --report_only read back those finished; then write
    the report of every finished cell."""
    if args.report_only:
        done = finished(out, cells)
        if not done:
            raise SystemExit(f"error: --report_only: no finished cell in {out} for these concepts, methods and seeds")
        print(f"{len(done)} of {len(cells)} cells finished; the report covers those", flush=True)
        return report(args, world, out, done)
    (out / "protocol.json").write_text(json.dumps(protocol, indent=1) + "\n")  # OUT is this process's (its lock)
    if world:
        from worlds.comparison import write_floor_captions, write_prompts
        write_prompts(world, out, concepts, args.num_prompts)
        floors = [c[0] for c in set(cells) - set(finished(out, cells)) if c[3] == "floor"]
        if floors:  # the base model's best description of each concept, chosen once, before any cell runs
            write_floor_captions(world, out, floors, args.base_model, args.sampler_steps,
                                 "cuda" if torch.cuda.is_available() else "cpu")
    if args.launcher != "slurm":  # cells a Slurm job may still be running stay its own
        jobs.check_no_slurm_jobs(out, cells)
    if args.launcher == "local":
        run_local(args, cells)
        return report(args, world, out, cells)
    ended = jobs.run_jobs(args, out, cells, options)
    if ended is None:  # --detach
        return None
    done, failed = ended
    results = report(args, world, out, done) if done else {}
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(cells)} cells failed (named above); rerun the same command "
                         "to resubmit them (their trainings resume from their checkpoints)")
    return results


def report(args, world, out, cells):
    """The report of these (finished) cells from their metrics: sweep.md/.json and the scatter, or the world's
    comparison; returns {(concept, method, seed): metrics}."""
    results = {(c[0], c[3], c[4]): json.loads(metrics_file(out, c).read_text()) for c in cells}
    if world:
        text = gather_world(world, results, out, cells, args.base_model)
        if args.publish:  # the report alone, for a repository: the cells' images and weights stay in OUT
            Path(args.publish).mkdir(parents=True, exist_ok=True)
            for name in PUBLISHED:
                if (out / name).is_file():
                    shutil.copyfile(out / name, Path(args.publish) / name)
            from worlds.record import write_record  # and what it is computed from, as OUT lays it out
            write_record(out, [cell_path(out, c) for c in cells], grid_samples(out, cells), Path(args.publish) / "sweep")
    else:
        text = dreambench.write_table({(c, m if seed is None else f"{m} seed {seed}"): r
                                       for (c, m, seed), r in results.items()}, out)
    print(text)
    return results


if __name__ == "__main__":
    main()
