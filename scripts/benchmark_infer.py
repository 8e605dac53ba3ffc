"""Time infer.py as a user runs it: wall seconds for N images at S sampler steps, loading included,
with and without --attention_maps, on a layout with random weights (no download).

    python scripts/benchmark_infer.py --layout sd21 --device cuda --dtype fp16   # SD 2.1-base layout, 512 px
    python scripts/benchmark_infer.py                                            # CPU: the small layout

The layout (scripts/benchmark.py's) is saved once as a diffusers folder in `--dtype` with a
learned-embedding file; then each mode runs `--repeats` times as its own `python infer.py`
process, alternating, and the median is reported (the first run also pays the disk cache).
"""
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout, when the package is not installed
from attndreambooth.cli import Parser  # noqa: E402


def save_layout(layout, folder, dtype, device):
    """The layout as a stock StableDiffusionPipeline folder plus learned_embeds.safetensors ({"<v>": row})."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from attndreambooth.config.plan import DTYPES
    from benchmark import build
    _, (tokenizer,), (text_encoder,), vae, unet, _ = build(layout, device)  # an SD layout: one encoder
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to("cpu", DTYPES[dtype]).save_pretrained(folder / "model", safe_serialization=True)
    row = text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("toy</w>")]
    save_file({"<v>": row.detach().float().cpu().contiguous()}, folder / "learned_embeds.safetensors")


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--layout", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmark_infer.json")
    args = p.parse_args(argv)
    dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    modes = {"plain": [], "attention_maps": ["--attention_maps"]}
    times = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_layout(args.layout, tmp, dtype, args.device)
        for _ in range(args.repeats):
            for mode, flags in modes.items():
                cmd = [sys.executable, str(ROOT / "infer.py"), "--base", str(tmp / "model"),
                       "--embeds", str(tmp / "learned_embeds.safetensors"), "--category", "toy",
                       "--prompt", "a {} on the beach", "--num_images", str(args.num_images),
                       "--batch_size", str(args.num_images), "--steps", str(args.steps), "--dtype", dtype,
                       "--device", args.device, "--out", str(tmp / "samples"), *flags]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode:
                    sys.exit(f"infer.py failed ({mode}):\n{done.stderr[-4000:]}")
                times[mode].append(time.perf_counter() - t0)
                print(f"{mode}: {times[mode][-1]:.2f} s", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = {m: dict(median_s=statistics.median(t), all_s=t) for m, t in times.items()}
    table = (f"| infer.py, {args.layout} layout, {dtype}, {args.num_images} images x {args.steps} steps "
             "| wall s (loading included) |\n|---|---|\n"
             + "\n".join(f"| {m} | {r['median_s']:.2f} |" for m, r in rows.items()))
    from benchmark import write_result
    result = dict(device=device, torch=torch.__version__, args=vars(args), dtype=dtype, rows=rows, table=table)
    return write_result(result, args.out, f"device: {device}")


if __name__ == "__main__":
    main()
