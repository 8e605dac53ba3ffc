"""What compilation costs and saves, per `runtime.compile` mode: each mode trains every stage in a process of
its own with an empty compile cache (cold), then again in a second process on the cache the first kept
(warm). Per row: the compile seconds (the warm-up steps beyond the steady step time, all stages), the
compilations and FX-graph cache hits/misses of the run, the ATen ops of one stage-3 step (a proxy for
kernel launches: torch.profiler's count), and the stage-3 step time against eager.

    python tools/compile_bench.py --layout small --out docs/reports/compile_cpu.md          # 2-core CPU: ~30 min
    python tools/compile_bench.py --layout sd21 --device cuda --precision bf16 --batch_size 8 --out docs/reports/gpu/compile.md
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attndreambooth.machine import cpu

ROOT = Path(__file__).resolve().parents[1]
MODES = {"off": "fast+cl", "regional": "fast+regional", "regional+resnet": "fast+regional+resnet",
         "full": "fast+compile"}  # benchmark.py's variants; regional+resnet: the ResNet blocks compiled too


def run(mode, cache, args, tmp):
    """One process of benchmark.py for `mode`; its result row."""
    out = Path(tmp) / f"{mode}-{len(list(Path(tmp).glob('*.json')))}.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--layout", args.layout, "--device", args.device,
           "--precision", args.precision, "--batch_size", str(args.batch_size), "--variants", MODES[mode],
           "--warmup", "1", "--steps", str(args.steps), "--repeats", "1", "--count_ops", "--compile_cache", str(cache),
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["rows"][0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage after the one warm-up step")
    p.add_argument("--modes", default="off,regional,full")
    p.add_argument("--out", default="compile.md")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            cache = Path(tmp) / f"cache-{mode}"  # empty: the first process compiles everything
            for kind in (["cold", "warm"] if mode != "off" else ["eager"]):
                row = run(mode, cache, args, tmp)
                rows.append(dict(mode=mode, kind=kind, **row))
                print(json.dumps(rows[-1]), flush=True)
    eager = next((r for r in rows if r["mode"] == "off"), None)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu()
    lines = [f"# Compilation, measured: {device}, torch {torch.__version__}, layout {args.layout}, batch "
             f"{args.batch_size}, {args.precision}", "",
             "| mode | process | compile s (all stages) | compilations | FX cache hits / misses | ATen ops per stage-3 step "
             "| stage-3 s/step | vs eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["compilations"]
        ratio = f"{eager['stage3_s_per_step'] / r['stage3_s_per_step']:.2f}x" if eager else "n/a"
        compile_s = "-" if r["mode"] == "off" else f"{r['warmup_extra_s']:.1f}"
        lines.append(f"| {r['mode']} | {r['kind']} | {compile_s} | {c['graphs']} | {c['cache_hits']} / {c['cache_misses']} "
                     f"| {r['stage3_aten_ops']:,} | {r['stage3_s_per_step']:.3f} | {ratio} |")
    Path(args.out).write_text("\n".join(lines) + "\n\nRows: " + json.dumps(rows) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
