"""Train, generate and evaluate a grid of concepts x methods; one process per GPU; resumable.

    python scripts/sweep.py --dreambench ../shared/datasets/dreambooth --subjects dog,backpack \
        --methods attndreambooth,baselines/textual_inversion,baselines/dreambooth,baselines/ti_db \
        --out sweeps/dreambench --num_images 4

    python scripts/sweep.py --concepts toy=data/sample_toy:toy --methods attndreambooth,ablations/no_reg \
        --set model.pretrained=tiny --set data.resolution=64 --clip tiny --dino tiny --out sweeps/tiny

A method is a config name under configs/ ("attndreambooth", "baselines/dreambooth", "ablations/no_stage2",
or a path). Each cell (concept, method) lives in OUT/<concept>/<method>/ as run/, samples/ and eval/;
a cell whose eval/metrics.json exists is skipped, and an interrupted training resumes. Cells run in
parallel, one per visible GPU (CUDA_VISIBLE_DEVICES), one at a time on a CPU. The gathered table,
sweep.json and the identity-vs-text scatter (one point per method) land in OUT.
"""
import argparse
import concurrent.futures
import json
import os
import queue
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
LIVE_CLASSES = {"dog", "cat"}  # DreamBench: live subjects get the live-subject prompts


def dreambench_concepts(root, subjects):
    """{subject: (folder, class)} from the DreamBooth data set's prompts_and_classes.txt."""
    root = Path(root)
    classes = {}
    for line in (root / "prompts_and_classes.txt").read_text().splitlines():
        name, sep, cls = line.partition(",")
        if sep and name != "subject_name" and (root / name).is_dir():
            classes[name] = cls.strip()
    missing = [s for s in subjects if s not in classes]
    if missing:
        raise SystemExit(f"error: --subjects {missing} not in {root} (known: {', '.join(sorted(classes))})")
    return {s: (root / s, classes[s]) for s in subjects}


def method_config(name):
    path = Path(name) if name.endswith(".yaml") else ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: method {name!r}: no config {path}")
    return path


def run_cell(concept, folder, category, method, args, gpu):
    """Train, generate, evaluate one cell in subprocesses on one GPU; returns its metrics."""
    cell = Path(args.out) / concept / method.replace("/", "_")
    metrics = cell / "eval" / "metrics.json"
    if metrics.is_file():
        print(f"[{concept} / {method}] done before: skipped", flush=True)
        return json.loads(metrics.read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    prompts = args.prompt_file or ROOT / "data" / "prompts" / (
        "dreambench_live.txt" if category in LIVE_CLASSES else "dreambench_object.txt")
    steps = [
        [sys.executable, ROOT / "train_attndreambooth.py", "--config", method_config(method),
         f"data.instance_dir={folder}", f"data.category={category}", f"output_dir={cell / 'run'}", *args.set],
        [sys.executable, ROOT / "infer.py", cell / "run", "--prompt_file", prompts, "--num_images", args.num_images,
         "--out", cell / "samples", *args.infer_args.split()],
        [sys.executable, ROOT / "scripts" / "evaluate.py", "--samples", cell / "samples", "--real", folder,
         "--clip", args.clip, "--dino", args.dino, "--name", method, "--out", cell / "eval"],
    ]
    cell.mkdir(parents=True, exist_ok=True)
    with open(cell / "sweep.log", "a") as log:
        for cmd in steps:
            print(f"[{concept} / {method}] {Path(cmd[1]).name}", flush=True)
            done = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"{concept} / {method}: {Path(cmd[1]).name} failed; see {cell / 'sweep.log'}")
    return json.loads(metrics.read_text())


def gather(results, out):
    """The table (one row per cell, then the mean of each method) and the scatter of method means."""
    from evaluate import scatter
    lines = ["| concept | method | CLIP-I | CLIP-T | DINO |", "|---|---|---|---|---|"]
    by_method = {}
    for (concept, method), r in sorted(results.items()):
        o = r["overall"]
        by_method.setdefault(method, []).append(o)
        lines.append(f"| {concept} | {method} | {o['clip_i']:.3f} | {o['clip_t']:.3f} | {o['dino']:.3f} |")
    means = {m: {k: statistics.mean(o[k] for o in os_) for k in ("clip_i", "clip_t", "dino")}
             for m, os_ in by_method.items()}
    for m, o in means.items():
        lines.append(f"| **mean of {len(by_method[m])}** | **{m}** | {o['clip_i']:.3f} | {o['clip_t']:.3f} | {o['dino']:.3f} |")
    table = "\n".join(lines)
    (out / "sweep.md").write_text(table + "\n")
    (out / "sweep.json").write_text(json.dumps(dict(
        cells=[dict(concept=c, method=m, **r["overall"]) for (c, m), r in sorted(results.items())],
        methods=means), indent=1))
    scatter([(m, o["clip_t"], o["dino"]) for m, o in means.items()], out / "scatter.png")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", default="", help="name=folder:category,... (your own concepts)")
    p.add_argument("--dreambench", help="the DreamBooth data set folder (with prompts_and_classes.txt)")
    p.add_argument("--subjects", default="", help="DreamBench subjects, e.g. dog,backpack")
    p.add_argument("--methods", default="attndreambooth", help="config names, comma-separated")
    p.add_argument("--out", required=True)
    p.add_argument("--num_images", type=int, default=4, help="images per prompt (DreamBench: 4)")
    p.add_argument("--prompt_file", help="default: DreamBench live or object prompts by category")
    p.add_argument("--set", action="append", default=[], help="a key=value for every training (repeatable)")
    p.add_argument("--infer_args", default="", help="extra infer.py arguments, e.g. '--steps 25'")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32")
    p.add_argument("--dino", default="facebook/dino-vits16")
    p.add_argument("--gpus", help="GPU indices to use (default: all visible; none on a CPU machine)")
    args = p.parse_args(argv)

    concepts = {}
    for item in filter(None, args.concepts.split(",")):
        name, _, rest = item.partition("=")
        folder, _, category = rest.rpartition(":")
        concepts[name] = (Path(folder), category)
    if args.dreambench:
        concepts.update(dreambench_concepts(args.dreambench, list(filter(None, args.subjects.split(",")))))
    if not concepts:
        raise SystemExit("error: give --concepts or --dreambench with --subjects")
    methods = args.methods.split(",")
    for m in methods:
        method_config(m)
    gpus = ([int(g) for g in args.gpus.split(",")] if args.gpus
            else list(range(torch.cuda.device_count())) or [None])
    free = queue.Queue()
    for g in gpus:
        free.put(g)

    def task(cell):
        gpu = free.get()
        try:
            return run_cell(*cell, args, gpu)
        finally:
            free.put(gpu)

    cells = [(c, folder, cat, m) for c, (folder, cat) in concepts.items() for m in methods]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(len(gpus)) as pool:
        results = dict(zip([(c, m) for c, _, _, m in cells], pool.map(task, cells)))
    table = gather(results, out)
    print(table)
    return results


if __name__ == "__main__":
    main()
