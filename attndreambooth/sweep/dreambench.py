"""DreamBench (the DreamBooth data set: 30 subjects, 25 prompts each) as a sweep's concepts: the subjects and
their classes, the prompt list each class gets, and the table of CLIP-I / CLIP-T / DINO per cell and method.
scripts/sweep.py --dreambench runs it; the worlds' counterpart is worlds/comparison.py."""
import json
import statistics
from pathlib import Path

from attndreambooth.sweep.scatter import scatter

PROMPTS = Path(__file__).resolve().parents[2] / "data" / "prompts"
LIVE_CLASSES = {"dog", "cat"}  # live subjects get the live-subject prompts, as in the DreamBooth paper


def concepts(root, subjects):
    """{subject: (folder, class)} from the data set's prompts_and_classes.txt."""
    root = Path(root)
    if not (root / "prompts_and_classes.txt").is_file():
        raise SystemExit(f"error: --dreambench {root} has no prompts_and_classes.txt; give the DreamBooth data set's "
                         "folder (github.com/google/dreambooth, dataset/)")
    classes = {}
    for line in (root / "prompts_and_classes.txt").read_text().splitlines():
        name, sep, cls = line.partition(",")
        if sep and name != "subject_name" and (root / name).is_dir():
            classes[name] = cls.strip()
    missing = [s for s in subjects if s not in classes]
    if missing:
        raise SystemExit(f"error: --subjects {missing} not in {root} (known: {', '.join(sorted(classes))})")
    return {s: (root / s, classes[s]) for s in subjects}


def prompt_file(category):
    return PROMPTS / ("dreambench_live.txt" if category in LIVE_CLASSES else "dreambench_object.txt")


def write_table(results, out):
    """{(concept, method): evaluate.py's metrics} -> OUT/sweep.md (one row per cell, then each method's mean),
    sweep.json and scatter.png (method means); returns the table."""
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
