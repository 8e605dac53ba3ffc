"""Time the three stages of this implementation against the released code's approach, side by side.

    python scripts/benchmark.py                                    # CPU: small SD-shaped layout
    python scripts/benchmark.py --layout sd21 --device cuda --precision bf16 --batch_size 8 \
        --variants reference,fast --presets default,low
    python scripts/benchmark.py --layout sdxl --device cuda --precision bf16 --batch_size 4 \
        --variants fast --presets default,low,lora,lora_half     # SDXL-base, 1024 px, full and LoRA

Models are built from config with random weights (same cost as real ones; no download). Each
variant runs the trainer's own `train_stage` for every stage: `--warmup` steps, then `--steps`
timed steps (each ends in a device sync, the loss's .item()); the per-step median is projected
onto the paper's schedule (60/100/500 steps) plus the one-time VAE encoding of the view pool.
Variants add one optimisation at a time, so each row says what it contributed:

    reference       eager attention in every layer, full 77-column maps, VAE and text encoder every step
    +sdpa           self-attention on SDPA, explicit probabilities only in attn2, 2 columns kept
    +latent_cache   each view VAE-encoded once (posterior mean/std), latents sampled per step
    +text_cache     cached text conditioning in stages 2-3, the text encoder at batch 1 in stage 1
    fast            + fused AdamW; this is what train_attndreambooth.py does
    fast+cl         + channels_last U-Net;  fast+regional / fast+compile: + torch.compile, regional / full
"""
import gc
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # worlds/ and bench/ live beside the package

import torch

from bench.layouts import LAYOUTS, build, model_flops  # noqa: F401 (build: benchmark_infer)
from attndreambooth.cli import Parser
from attndreambooth.trainer.memory import LADDER, LORA_RANK

# Memory presets beyond the trainer's default and low: the card presets' LoRA rungs (attndreambooth.trainer.memory):
# the U-Net stages as LoRA (rank 32) with gradient checkpointing, and that with half-precision frozen weights.
SWITCHES = ("gradient_checkpointing", "optimizer_8bit", "half_frozen_weights")
LORA_PRESETS = {name: {k: getattr(savers, k) for k in SWITCHES} for name, savers in (("lora", LADDER[3]),
                                                                                     ("lora_half", LADDER[4]))}
VARIANTS = {
    "reference": dict(capture="reference", latents="every_step", cache_text=False, fused_adamw=False),
    "+sdpa": dict(capture="fast", latents="every_step", cache_text=False, fused_adamw=False),
    "+latent_cache": dict(capture="fast", latents="pool", cache_text=False, fused_adamw=False),
    "+text_cache": dict(capture="fast", latents="pool", cache_text=True, fused_adamw=False),
    "fast": dict(capture="fast", latents="pool", cache_text=True),
    "fast+cl": dict(capture="fast", latents="pool", cache_text=True, channels_last=True),
    "fast+regional": dict(capture="fast", latents="pool", cache_text=True, channels_last=True, compile="regional"),
    "fast+regional+resnet": dict(capture="fast", latents="pool", cache_text=True, channels_last=True,
                                 compile="regional", regions=("BasicTransformerBlock", "ResnetBlock2D")),
    "fast+compile": dict(capture="fast", latents="pool", cache_text=True, channels_last=True, compile="full"),
    "fast+graph": dict(capture="fast", latents="pool", cache_text=True, channels_last=True, cuda_graph=True),
    "fast+graph+regional": dict(capture="fast", latents="pool", cache_text=True, channels_last=True, cuda_graph=True,
                                compile="regional"),
}
PAPER_STEPS = {"stage1": 60, "stage2": 100, "stage3": 500}
PEAK_TFLOPS = {"H100": {"bf16": 989, "fp16": 989, "fp32": 494}, "H200": {"bf16": 989, "fp16": 989, "fp32": 494},
               "A100": {"bf16": 312, "fp16": 312, "fp32": 156}, "L40S": {"bf16": 362, "fp16": 362, "fp32": 183},
               "4090": {"bf16": 165, "fp16": 165, "fp32": 83}}  # dense tensor-core peaks; fp32 = TF32


class Recorder:
    """A Reporter stand-in that keeps each step's record and when it arrived: records arrive when the trainer
    reads a step's losses back (every `log_every_steps`), so an arrival time is a synchronised clock."""

    def __init__(self):
        self.records, self.arrived = [], []

    def step(self, record, steps):
        self.records.append(record), self.arrived.append(time.perf_counter())


class OpCounter:
    """FaultInjection points that count the ATen ops (a proxy for kernel launches) of one step, `point` ("stage3:4")."""

    def __init__(self, before, point):
        self.before, self.point, self.profiler, self.count = before, point, None, None

    def loss(self, point, loss):
        return loss

    def at(self, point):
        if point == self.before:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]).__enter__()
        elif point == self.point and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.count = sum(e.count for e in self.profiler.key_averages() if e.key.startswith("aten::"))


def run_variant(variant, preset, args):
    """Time every stage of one variant; returns a result row."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from attention_reg import CrossAttentionCapture
    from bench.reference import EncodeEveryStep, ReferenceCapture
    from attndreambooth.config.loading import load_config
    from attndreambooth.config.plan import DTYPES, Plan
    from attndreambooth.config.schema import MEMORY_PRESETS
    from attndreambooth.trainer.concept import add_concept_token, encode_prompt
    from attndreambooth.trainer.data import LatentBatches, encode_pixels
    from attndreambooth.trainer.lora import add_adapters
    from attndreambooth.trainer.compiling import compile_counts, compile_unet, use_cache
    from attndreambooth.trainer.method import train_stage
    from attndreambooth.trainer.models import Models
    flags = VARIANTS[variant]
    if flags.get("cuda_graph") and not args.device.startswith("cuda"):
        raise SystemExit(f"error: {variant} captures the step as a CUDA graph: it needs --device cuda")
    memory = dict(MEMORY_PRESETS.get(preset) or LORA_PRESETS[preset])
    if args.no_8bit:
        memory["optimizer_8bit"] = False
    cfg = load_config(None, ["output_dir=unused", "data.instance_dir=.", "data.category=toy",
                             f"runtime.optimizer_8bit={memory['optimizer_8bit']}",
                             f"runtime.fused_adamw={flags.get('fused_adamw', True)}",
                             f"runtime.cuda_graph={flags.get('cuda_graph', False)}",
                             *([f"stages.stage{i}.lora_rank={LORA_RANK}" for i in (2, 3)]
                               if preset in LORA_PRESETS else [])],
                      check=False)
    AcceleratorState._reset_state(True)
    gc.collect()  # the previous variant's models must not count in this one's peak memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(args.precision, args.precision),
                              cpu=args.device == "cpu")
    device, B, res = accelerator.device, args.batch_size, LAYOUTS[args.layout]["resolution"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    family, tokenizers, encoders, vae, unet, scheduler = build(args.layout, device)
    input_ids = []
    for tokenizer, encoder in zip(tokenizers, encoders):  # SDXL: [V] in the second encoder too
        ids, v_pos, cat_pos = encode_prompt(tokenizer, "a photo of a <v> toy",
                                            *add_concept_token(tokenizer, encoder, "<v>", "toy"))
        input_ids.append(ids)
    if memory["half_frozen_weights"]:  # as the trainer: frozen encoders and the adapters' U-Net in half precision
        for model in (*encoders, unet):
            model.to(DTYPES[args.precision])
    add_adapters(unet, Plan(cfg.stages), family)
    if memory["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    if flags.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.images * args.views, 3, res, res, generator=gen).mul(2).sub(1).to(device)
    setup = 0.0
    if flags["latents"] == "pool":  # one-time cost of the fast path, counted in the projection
        t0 = _sync_time(device)
        with accelerator.autocast():
            mean, std = encode_pixels(vae, pixels, device)
        setup = _sync_time(device) - t0
        vae.to("cpu")  # leaves the training device, as in the trainer
        geometry = torch.tensor([[res, res, 0, 0, res, res]] * mean.shape[0], dtype=torch.float32)
        sampler = LatentBatches(mean, std, args.images, vae.config.scaling_factor, gen, geometry)
    else:
        sampler = EncodeEveryStep(vae, pixels, vae.config.scaling_factor, gen, accelerator.autocast)
    capture_cls = ReferenceCapture if flags["capture"] == "reference" else CrossAttentionCapture
    capture = capture_cls(unet, [v_pos, cat_pos], None)  # every cross-attention layer, however many
    ids = [i.to(device) if flags["cache_text"] else i.repeat(B, 1).to(device) for i in input_ids]
    models = Models(family, unet, encoders, scheduler, capture, ids, cache_text=flags["cache_text"])
    row = dict(variant=variant, preset=preset, precision=args.precision, batch_size=B, setup_s=setup)
    with capture:
        if flags.get("compile"):
            use_cache(args.compile_cache, device)
            compile_unet(unet, flags["compile"], **({"regions": flags["regions"]} if "regions" in flags else {}))
        for planned in Plan(cfg.stages):
            name = planned.name
            if name not in args.stages.split(","):
                continue
            planned = replace(planned, config=replace(planned.config, steps=args.warmup + args.steps, batch_size=B))
            rec, cfg.runtime.log_every_steps = Recorder(), max(1, args.warmup)  # reads: after the warm-up, at the end
            total = args.warmup + args.steps
            ops = OpCounter(f"{name}:{total - 1}", f"{name}:{total}") if args.count_ops else None
            start = time.perf_counter()
            _, peak = train_stage(planned, models, sampler, accelerator, cfg, rec, faults=ops)
            warm = rec.arrived[args.warmup - 1] if args.warmup else start  # after a read: the device is done
            end = rec.arrived[-1]
            row[f"{name}_s_per_step"] = (end - warm) / args.steps
            # what the warm-up steps cost beyond steady state: compilation, autotuning, allocator growth
            row[f"{name}_warmup_extra_s"] = (warm - start) - args.warmup * row[f"{name}_s_per_step"]
            row[f"{name}_peak_gib"] = peak if device.type == "cuda" else None
            row[f"{name}_aten_ops"] = ops.count if ops else None
    row["compilations"] = compile_counts()
    row["schedule_s"] = setup + sum(n * row.get(f"{k}_s_per_step", 0) for k, n in PAPER_STEPS.items())
    row["warmup_extra_s"] = sum(row.get(f"{k}_warmup_extra_s", 0) for k in PAPER_STEPS)
    return row


def _sync_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def markdown(rows, flops, peak):
    head = ("| variant | preset | precision | s/step stage 1 / 2 / 3 | samples/s (stage 3) | schedule s | vs reference "
            "| TFLOP/s (stage 3) | MFU | peak GiB stage 1 / 2 / 3 | warm-up extra s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        tflops = flops["stage3"] / r["stage3_s_per_step"] / 1e12
        mfu = f"{tflops / peak:.0%}" if peak else "n/a"
        mem = " / ".join("n/a" if r.get(f"{s}_peak_gib") is None else f"{r[f'{s}_peak_gib']:.1f}" for s in PAPER_STEPS)
        steps = " / ".join(f"{r[f'{s}_s_per_step']:.3f}" if f"{s}_s_per_step" in r else "-" for s in PAPER_STEPS)
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "n/a"
        lines.append(f"| {r['variant']} | {r['preset']} | {r['precision']} | {steps} "
                     f"| {r['batch_size'] / r['stage3_s_per_step']:.1f} | {r['schedule_s']:.1f} "
                     f"| {speedup} | {tflops:.2f} | {mfu} | {mem} | {r['warmup_extra_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--layout", default="small", choices=sorted(LAYOUTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--variants", default="reference,+sdpa,+latent_cache,+text_cache,fast")
    p.add_argument("--presets", default="default", help="memory presets for the non-reference variants")
    p.add_argument("--no_8bit", action="store_true", help="low preset without 8-bit AdamW (no bitsandbytes)")
    p.add_argument("--stages", default="stage1,stage2,stage3", help="stages to time (the schedule column sums these)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant; the median schedule is kept")
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--views", type=int, default=8, help="augmented views per image in the pool")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: known table by GPU name)")
    p.add_argument("--compile_cache", default="~/.cache/attndreambooth/compile", help="compiled graphs kept here")
    p.add_argument("--count_ops", action="store_true", help="count the ATen ops of each stage's last step")
    p.add_argument("--out", default="benchmark.json")
    args = p.parse_args(argv)

    flops = model_flops(args.layout, args.batch_size)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v[args.precision] for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    cells = [(v, p) for v in args.variants.split(",") for p in (["default"] if v == "reference" else args.presets.split(","))]
    runs = {cell: [] for cell in cells}
    for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every variant
        for cell in cells:
            runs[cell].append(run_variant(*cell, args))
            print(json.dumps(runs[cell][-1]), flush=True)
    rows = []
    for cell in cells:
        row = dict(sorted(runs[cell], key=lambda r: r["schedule_s"])[len(runs[cell]) // 2])  # the median run
        row["schedule_s_all"] = [r["schedule_s"] for r in runs[cell]]
        rows.append(row)
    ref = next((r for r in rows if r["variant"] == "reference"), None)
    for r in rows:
        r["speedup"] = ref["schedule_s"] / r["schedule_s"] if ref else None
    table = markdown(rows, flops, peak)
    result = dict(device=device_name, torch=torch.__version__, layout=args.layout, args=vars(args),
                  model_flops_per_step=flops, peak_tflops=peak, rows=rows, table=table)
    return write_result(result, args.out, f"device: {device_name}, layout {args.layout}")


def write_result(result, out, header):
    """`out` (JSON) and its .md twin (header + table); prints the table."""
    Path(out).write_text(json.dumps(result, indent=1))
    Path(out).with_suffix(".md").write_text(f"{header}\n\n{result['table']}\n")
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
