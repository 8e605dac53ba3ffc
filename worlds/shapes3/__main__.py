"""Pretrain the third shapes world's model (text encoder, VAE, U-Net), in resumable pieces, watched by gates.

    python -m worlds.shapes3 --out runs/shapes3                    # the whole run; rerun the same to continue
    python -m worlds.shapes3 --out runs/shapes3 --time_limit 150   # a piece of it (minutes)
    python -m worlds.shapes3 --out runs/shapes3 --grounding 0.05 --grounding_from 7200 --grounding_until 11000
        # from step 7,200 on, each object word's attention pulled onto its object, annealed away by 11,000
    python -m worlds.shapes3 --out /tmp/s3 --text_steps 20 --vae_steps 20 --unet_steps 20 --chunk 64 \\
        --vae_chunk 96 --batch 8 --decay_steps 5 --probe_every 10 --probe_captions 4   # a smoke run

The state (OUT/pretrain_state.pt) is written every few minutes, at --time_limit and at the end of the step a
SIGTERM arrives in (Ctrl-C keeps the last one written); the same command continues
it to the same bytes as an uninterrupted run (same machine, torch and thread count). A missed gate stops the
run (OUT/pretrain.log says which and why); --override_gates continues past it. Where the VAE's and the U-Net's
learning-rate decay begins the state is also kept (OUT/stable_vae.pt, OUT/stable_unet.pt): --from_stable PHASE with
a larger --vae_steps or --unet_steps continues from there with a longer stable phase.
When done, OUT holds a stock diffusers StableDiffusionPipeline (fp16 safetensors) and gates.json.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m worlds.shapes3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the run state, its log and the finished pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text_steps", type=int, default=1000)
    p.add_argument("--text_batch", type=int, default=256)
    p.add_argument("--text_lr", type=float, default=1e-3)
    p.add_argument("--vae_steps", type=int, default=10000)
    p.add_argument("--vae_batch", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_chunk", type=int, default=3072, help="fresh images per VAE chunk (each used twice)")
    p.add_argument("--unet_steps", type=int, default=15000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4, help="the stable phase's learning rate")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--decay_steps", type=int, default=3000, help="the last steps, decaying linearly to a tenth")
    p.add_argument("--min_snr", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--offset_noise", type=float, default=0.1)
    p.add_argument("--grounding", type=float, default=0.0, help="weight of a term pulling each object word's "
                   "cross-attention onto its object (TokenCompose's token loss; worlds/shapes3/grounding.py); 0: none")
    p.add_argument("--grounding_from", type=int, default=0, help="the U-Net step the grounding term begins")
    p.add_argument("--grounding_until", type=int, default=0, help="the step by which it has fallen to 0 (at the "
                   "latest where the learning rate's decay begins)")
    p.add_argument("--grounding_anneal", type=int, default=1000, help="the steps over which it falls linearly to 0")
    p.add_argument("--chunk", type=int, default=4096, help="fresh scenes per U-Net chunk")
    p.add_argument("--passes", type=int, default=4, help="times each fresh scene is used")
    p.add_argument("--probe_every", type=int, default=400, help="U-Net steps between measurements (and gates)")
    p.add_argument("--probe_captions", type=int, default=50)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--time_limit", type=float, default=None, help="minutes of training for this process")
    p.add_argument("--checkpoint_minutes", type=float, default=5.0)
    p.add_argument("--override_gates", action="store_true", help="continue past a missed gate (logged)")
    p.add_argument("--from_stable", choices=("vae", "unet"), help="continue from OUT/stable_PHASE.pt, kept where that "
                   "phase's decay began (with a larger --vae_steps or --unet_steps: a longer stable phase); the "
                   "current state is set aside as pretrain_state.before_PHASE.pt, once: the same command continues")
    p.add_argument("--restart", action="store_true", help="discard the run state in --out and start over")
    args = p.parse_args(argv)
    positive = ("text_steps", "text_batch", "vae_steps", "vae_batch", "vae_chunk", "unet_steps", "batch", "chunk",
                "passes", "probe_every", "probe_captions")
    for key in positive:
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1 (got {getattr(args, key)})")
    if not 0 <= args.decay_steps < args.unet_steps or args.warmup > args.unet_steps - args.decay_steps:
        p.error("--warmup <= --unet_steps - --decay_steps, and --decay_steps < --unet_steps")
    if args.grounding < 0 or (args.grounding and not (
            0 <= args.grounding_from <= args.grounding_until - args.grounding_anneal
            and args.grounding_anneal >= 1 and args.grounding_until <= args.unet_steps - args.decay_steps)):
        p.error("--grounding needs 0 <= --grounding_from <= --grounding_until - --grounding_anneal, "
                "--grounding_anneal >= 1, and --grounding_until <= --unet_steps - --decay_steps (annealed away "
                "before the decay)")
    if args.chunk * args.passes < args.batch or args.vae_chunk * 2 < args.vae_batch:
        p.error("--chunk * --passes must hold a --batch, and 2 * --vae_chunk a --vae_batch")
    out = Path(args.out)
    if (out / "model_index.json").is_file():
        p.error(f"--out {out} already holds a finished model; choose another folder")
    if args.from_stable and not (out / f"stable_{args.from_stable}.pt").is_file():
        p.error(f"--from_stable {args.from_stable}: {out / f'stable_{args.from_stable}.pt'} does not exist (the run "
                "has not reached that phase's decay)")
    if args.device != "cpu":
        import torch
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    return p, args


def branch_from_stable(out, phase):
    """Continue from OUT/stable_<phase>.pt: the current state is set aside as pretrain_state.before_<phase>.pt
    and the stable one copied in, once; the same command afterwards continues the branch (True: branched now)."""
    state, before = out / "pretrain_state.pt", out / f"pretrain_state.before_{phase}.pt"
    if before.is_file() and state.is_file():
        return False
    if state.is_file():
        shutil.move(state, before)
    shutil.copy(out / f"stable_{phase}.pt", state)
    return True


def main(argv=None):
    p, args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from attndreambooth.families.source import quiet_known_noise, save_pipeline
    from worlds.shapes3.gates import Probe
    from worlds.shapes3.model import build
    from worlds.shapes3.pretrain import Pretraining
    quiet_known_noise()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "pretrain_state.pt"
    if args.restart:
        for f in ("pretrain_state.pt", "stable_vae.pt", "stable_unet.pt"):
            (out / f).unlink(missing_ok=True)
    if args.from_stable:
        branch_from_stable(out, args.from_stable)
    logfile = open(out / "pretrain.log", "a" if state.is_file() else "w")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    # with two threads some backward passes on the CPU (index accumulation) sum in a varying order: deterministic
    # kernels make a run reproducible from its seed and a resumed run bitwise (measured: no slower here)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    run = Pretraining(build(args.seed), args, log, state, Probe(log, args.override_gates, args.probe_captions))
    if state.is_file():
        try:
            run.load()
        except ValueError as e:
            p.error(str(e))
        log(f"continuing {state}: {run.phase} step {run.step}, {run.seconds:.0f} s of training so far "
            f"({torch.get_num_threads()} threads)")
    else:
        log(f"starting {out} with {json.dumps(vars(args))} ({torch.get_num_threads()} threads, torch "
            f"{torch.__version__})")
    try:
        verdict = run.run(None if args.time_limit is None else args.time_limit * 60, args.checkpoint_minutes * 60)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM while a checkpoint was written: the last whole one stays
        log("interrupted; the last checkpoint stays: run the same command to continue")
        raise SystemExit(130) from None
    (out / "gates.json").write_text(json.dumps(run.gates, indent=1))
    if verdict in ("time", "stopped"):
        log(f"{'time limit reached' if verdict == 'time' else 'stopped by SIGTERM after a checkpoint'}; run the "
            f"same command to continue ({run.phase} step {run.step})")
    if verdict != "done":
        return verdict
    run.ema_into_unet()
    from worlds.shapes.model import assemble_pipeline
    pipe = assemble_pipeline(run.vae, run.text_encoder, run.tokenizer, run.unet, run.scheduler)
    save_pipeline(pipe, out, torch.float16)
    log(f"saved {out} after {run.seconds:.0f} s of training")
    return verdict


if __name__ == "__main__":
    main()
