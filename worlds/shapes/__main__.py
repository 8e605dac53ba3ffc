"""Pretrain the shapes world's text-to-image model from scratch, then measure how well it follows prompts.
Reproducible from --seed; resumable: the same command continues a killed or time-limited run (its state is
OUT/pretrain_state.pt, written every few minutes) to the same weights as an uninterrupted run. Writes a
stock diffusers folder (fp16 safetensors) and report.json.

    python -m worlds.shapes --out runs/shapes_model                  # the shipped model (see README)
    python -m worlds.shapes --out runs/shapes_model --time_limit 150 # a piece of it; rerun to go on
    python -m worlds.shapes --out /tmp/s --vae_steps 20 --unet_steps 20 --chunk 64 --vae_chunk 64 \
        --batch 8 --eval_captions 8                                             # a smoke run

1. VAE and 2. U-Net + text encoder: worlds.shapes.pretrain (fresh scenes in chunks, min-SNR
   epsilon objective, caption dropout for classifier-free guidance, EMA weights saved).
3. The report (worlds.shapes.world_report): the VAE's round trip, held-out captions sampled with
   the stock pipeline (DPM++, CFG 7.5, 25 steps) and read back, the shape words' attention IoU, the
   concepts' descriptive-caption floor, a sample grid and a per-token attention figure.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from worlds.shapes.model import LATENT_CHANNELS, assemble_pipeline, build
from worlds.shapes.pretrain import Pretraining
from worlds.shapes.world_report import write_report
from attndreambooth.config.checks import folder_problem
from attndreambooth.families.source import quiet_known_noise, save_pipeline


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m worlds.shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline, report.json and the run state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent_channels", type=int, default=LATENT_CHANNELS)
    p.add_argument("--vae_steps", type=int, default=8000)
    p.add_argument("--vae_batch", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_chunk", type=int, default=3072, help="fresh images per VAE chunk (each used --passes times)")
    p.add_argument("--unet_steps", type=int, default=7000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine to a tenth)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--min_snr", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--short_prob", type=float, default=0.3, help="chance of a short caption (attributes left out)")
    p.add_argument("--chunk", type=int, default=4096, help="fresh scenes per U-Net chunk (each used --passes times)")
    p.add_argument("--passes", type=int, default=2, help="times each fresh scene is used")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--time_limit", type=float, default=None, help="minutes of training for this process; the state is "
                   "saved and the same command continues")
    p.add_argument("--checkpoint_minutes", type=float, default=5.0)
    p.add_argument("--eval_captions", type=int, default=200, help="held-out captions sampled for the report (0: none)")
    p.add_argument("--round_trip_scenes", type=int, default=300, help="scenes through the VAE for the report (0: none)")
    p.add_argument("--eval_only", action="store_true", help="measure (and picture) an existing --out, no training")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out (starts over)")
    p.add_argument("--restart", action="store_true", help="discard a run state in --out and start over")
    args = p.parse_args(argv)
    for key in ("vae_steps", "vae_batch", "vae_chunk", "unet_steps", "batch", "chunk", "passes", "latent_channels"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1 (got {getattr(args, key)})")
    if args.chunk * args.passes < args.batch or args.vae_chunk * args.passes < args.vae_batch:
        p.error("--chunk (--vae_chunk) times --passes must hold at least one --batch (--vae_batch)")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device {args.device!r}: use cpu or cuda")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    out = Path(args.out)
    if args.eval_only and not (out / "model_index.json").is_file():
        p.error(f"--eval_only: {out} holds no model (no model_index.json)")
    if not args.eval_only and (out / "model_index.json").is_file() and not args.overwrite:
        p.error(f"--out {out} already holds a model; choose another folder, or pass --overwrite to replace it")
    if not args.eval_only and (problem := folder_problem(out)):
        p.error(f"--out: {problem}")
    return p, args


def main(argv=None):
    quiet_known_noise()
    p, args = parse_args(argv)
    out = Path(args.out)
    if args.eval_only:
        report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
        return write_report(out, report, args, print)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "pretrain_state.pt"
    if args.restart or args.overwrite:
        state.unlink(missing_ok=True)
    logfile = open(out / "pretrain.log", "a" if state.is_file() else "w")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    torch.manual_seed(args.seed)
    run = Pretraining(build(args.seed, args.latent_channels), args, args.device, log, state)
    if state.is_file():
        try:
            run.load()
        except ValueError as e:
            p.error(str(e))
        log(f"continuing {state}: {run.phase} step {run.step}, {run.seconds:.0f} s of training so far")
    if not run.run(None if args.time_limit is None else args.time_limit * 60, args.checkpoint_minutes * 60):
        log(f"time limit reached; run the same command to continue ({run.phase} step {run.step})")
        return None
    run.ema_into_models()
    pipe = assemble_pipeline(run.vae, run.text_encoder, run.tokenizer, run.unet, run.scheduler)
    save_pipeline(pipe, out, torch.float16)
    log(f"saved {out} after {run.seconds:.0f} s of training")
    report = dict(seed=args.seed, args=vars(args), train_seconds=round(run.seconds), torch=torch.__version__,
                  device=args.device)
    return write_report(out, report, args, log)


if __name__ == "__main__":
    main()
