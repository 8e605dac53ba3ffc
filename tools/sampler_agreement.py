"""Whether a shapes sweep's sampler steps change its numbers: some of its finished cells sampled again with
more steps (default 25, the first comparison's), scored the same way, and the differences set beside the
report's paired differences. Nothing of the sweep is overwritten (the cells get samples_<N>/, eval_<N>/).

    python tools/sampler_agreement.py --out sweeps/shapes_r2 --cells 8 --steps 25

Writes OUT/sampler_agreement.md and .json: per cell the metrics at the sweep's steps and at --steps, and per
metric the mean and largest absolute difference.
"""
import argparse
import io
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # worlds/ and bench/ live beside the package

from worlds import load as load_world
from worlds.comparison import METRICS
from attndreambooth.sweep.cells import ROOT, call_in_process, cell_commands, cell_dir


def chosen_cells(out, n):
    """Up to n finished cells, one method after another, spread over the concepts: the k-th method (in name
    order) starts at its k-th finished cell (concepts, then seeds, in name order), and every method's next
    cell comes only after each method has one."""
    done = sorted(Path(out).glob("*/*/**/eval/metrics.json"))
    cells = []
    for metrics in done:
        rel = metrics.parent.parent.relative_to(out).parts  # concept, method[, seed_N]
        seed = int(rel[2].removeprefix("seed_")) if len(rel) == 3 else None
        cells.append((rel[0], rel[1], seed))
    by_method = {}
    for c in cells:
        by_method.setdefault(c[1], []).append(c)
    rows = [row[k % len(row):] + row[:k % len(row)] for k, row in enumerate(by_method.values())]
    order = [row[i] for i in range(max(map(len, rows), default=0)) for row in rows if i < len(row)]
    return order[:n]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a shapes sweep's folder (with protocol.json)")
    p.add_argument("--cells", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args(argv)
    out = Path(args.out)
    if not (out / "protocol.json").is_file():
        sys.exit(f"error: --out {out}: no protocol.json; give a folder scripts/sweep.py --world wrote")
    protocol = json.loads((out / "protocol.json").read_text())
    if args.steps == protocol["sampler_steps"]:
        sys.exit(f"error: --steps {args.steps} is the sweep's own; give another, e.g. 25")
    again = SimpleNamespace(**{**protocol, "out": str(out), "sampler_batch": 16, "sampler_steps": args.steps,
                               "base_model": protocol["base_model"].replace("<repository>", str(ROOT))})
    world, rows = load_world(protocol["world"]), []
    for concept, method_dir, seed in chosen_cells(out, args.cells):
        method = method_dir.replace("shapes_", "shapes/", 1) if method_dir.startswith("shapes_") else method_dir
        cell = cell_dir(out, concept, method, seed)
        names = (f"samples_{args.steps}", f"eval_{args.steps}")
        steps = cell_commands(concept, world.DATA / concept, world.CONCEPTS[concept][0], method, seed, again, cell,
                              *names)
        if not (cell / names[1] / "metrics.json").is_file():
            for script, script_argv in steps[-2:]:  # generate and score; the training is the cell's own
                call_in_process(script, script_argv, io.StringIO())
        before = json.loads((cell / "eval" / "metrics.json").read_text())["overall"]
        after = json.loads((cell / names[1] / "metrics.json").read_text())["overall"]
        rows.append(dict(concept=concept, method=method_dir, seed=seed, before=before, after=after))
        print(f"{concept} / {method_dir} / {seed}: " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}"
                                                                for k in before), flush=True)
    summary = {k: dict(mean_abs=statistics.mean(abs(r["after"][k] - r["before"][k]) for r in rows if k in r["before"]),
                       largest=max(abs(r["after"][k] - r["before"][k]) for r in rows if k in r["before"]))
               for k in METRICS if any(k in r["before"] for r in rows)}
    (out / "sampler_agreement.json").write_text(json.dumps(dict(sweep_steps=protocol["sampler_steps"],
                                                                steps=args.steps, cells=rows, summary=summary), indent=1))
    lines = [f"Sampler steps {protocol['sampler_steps']} (the sweep's) against {args.steps}, {len(rows)} cells:", "",
             "| metric | mean abs difference | largest |", "|---|---|---|"]
    lines += [f"| {METRICS[k]} | {v['mean_abs']:.4f} | {v['largest']:.4f} |" for k, v in summary.items()]
    (out / "sampler_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
