"""A run folder (the final state or the state after any stage), or a base model with an embedding and U-Net
weights, as a ready diffusers pipeline: what infer.py samples from. Files are checked for what they hold
before a model loads, and a mismatch is one line naming the option."""
import contextlib
from pathlib import Path

import torch

from attndreambooth.config.checks import lock_holder
from attndreambooth.config.loading import load_config
from attndreambooth.config.plan import DTYPES, LORA_FILE, Plan
from attndreambooth.config.schema import ModelConfig
from attndreambooth.families import of_pipeline
from attndreambooth.inference.sampling import check_sampler, set_scheduler


def stage_sources(run_dir, cfg, stage):
    """What the state after the `stage`-th stage (1-based, config order) is made of:
    (pipeline folder, []) for the final state, else (None, attn2 weight files) over the base model."""
    plan = Plan(cfg.stages)
    if isinstance(stage, str) and stage in plan.all_names:  # a stage's name, as in the config: its 1-based number
        stage = plan.all_names.index(stage) + 1
    kind, files = plan.state_after(stage)
    if kind == "pipeline" and plan.lora and not (run_dir / "pipeline").is_dir():
        kind, files = "base", [LORA_FILE]  # a LoRA run without a merged pipeline/: base + embedding + LoRA
    if kind == "pipeline":
        if not (run_dir / "pipeline" / "model_index.json").is_file() and (run_dir / "finished.json").is_file():
            raise FileNotFoundError(f"{run_dir} has finished but its pipeline/ is missing (deleted or moved?): restore "
                                    "it, or use --stage with an earlier stage; training again needs resume=false")
        if not (run_dir / "pipeline" / "model_index.json").is_file():
            raise FileNotFoundError(f"{run_dir} has not finished (no pipeline/): use --stage with a stage it has "
                                    f"completed, or {after_training(run_dir)}")
        return run_dir / "pipeline", []
    missing = [f for f in ["learned_embeds.safetensors", *files] if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--stage {stage}: {run_dir} has no {', '.join(missing)} yet (that stage has not "
                                f"finished); {after_training(run_dir)}")
    return None, [run_dir / f for f in files]


def after_training(run_dir):
    """What to do about a run that is not done: wait for the training that holds it, or resume it."""
    holder = lock_holder(run_dir)
    if holder:
        return f"it is training now ({holder}): wait for it to get there"
    return "resume training with the same command"


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
    from attndreambooth import families
    from attndreambooth.families.source import family_of
    if Path(embeds).suffix != ".safetensors":
        return
    keys, family = safetensors_keys(embeds, "--embeds"), family_of(base)
    if not family.is_own_embedding(keys):
        made_for = next(f for f in families.FAMILIES if f.is_own_embedding(keys))
        raise ValueError(f"--embeds {embeds} is {made_for.embedding_kind} but --base {base.pretrained} is "
                         f"{family.model_kind}; give the base the embedding was trained on")


def lora_mismatch(unet, state):
    """Why a LoRA file (peft / diffusers keys "unet.<module>.lora_A.weight", or kohya's
    "lora_unet_<module>.lora_down.weight") does not fit this U-Net, or None: a module it names is not a linear
    layer here, or the layer's width differs."""
    linear = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    by_kohya_name = {n.replace(".", "_"): n for n in linear}
    for key, tensor in state.items():
        if key.startswith("unet.") and ".lora_A." in key:
            name, width = key[len("unet."):].split(".lora_A.")[0], "in_features"
        elif key.startswith("unet.") and ".lora_B." in key:
            name, width = key[len("unet."):].split(".lora_B.")[0], "out_features"
        elif key.startswith("lora_unet_") and key.endswith((".lora_down.weight", ".lora_up.weight")):
            name = by_kohya_name.get(key.split(".")[0][len("lora_unet_"):], key.split(".")[0])
            width = "in_features" if ".lora_down." in key else "out_features"
        else:
            continue
        if name not in linear:
            return f"its {key} names {name}, which this U-Net does not have"
        got = tensor.shape[1] if width == "in_features" else tensor.shape[0]
        if got != getattr(linear[name], width):
            return f"its {key} is for a layer {got} wide, this U-Net's {name} is {getattr(linear[name], width)}"
    return None


def load_unet_weights(pipe, path):
    """Load a full or partial (e.g. attn2-only) U-Net state dict, or a LoRA file, from a safetensors file."""
    from safetensors.torch import load_file
    state, unet = load_file(path), of_pipeline(pipe).denoiser(pipe)
    if any(".lora" in k for k in state):  # diffusers' LoRA format (this trainer's, or any other)
        problem = lora_mismatch(unet, state)
        if problem:
            raise ValueError(f"{path} is a LoRA for another model: {problem}; give the base it was trained on")
        with quiet_libraries():  # else SDXL warns that text_encoder_2 has no LoRA keys (none are trained)
            pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)
        return
    unknown = sorted(set(state) - set(unet.state_dict()))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensors are not in this U-Net (first: {unknown[0]}); "
                         "are these weights for another base model?")
    unet.load_state_dict(state, strict=False)


def load_pipe(run_dir=None, stage=None, base=None, embeds=None, unet_weights=(), category=None,
              dtype="fp32", device="cpu", scheduler=None):
    """A pipeline with the learned concept; returns (pipe, text that `{}` stands for, base model name). With
    `base` and no `embeds`, the base model alone, `{}` standing for `category` (None: prompts without `{}`)."""
    from attndreambooth.families.source import family_of, load_pipeline, tiny_layouts
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
        for path in [embeds, *unet_weights] if embeds else []:  # e.g. cut short by a full disk or a partial copy
            safetensors_keys(path, "the run's")
    elif base is None or (embeds is not None and category is None):
        raise ValueError("give a run folder, or --base with --embeds and --category (a concept), or --base alone "
                         "(the base model; {} then stands for --category)")
    else:
        label = str(base)
    model = ModelConfig(pretrained=str(folder)) if base is None else (  # the run's pipeline/, or the base
        base if isinstance(base, ModelConfig) else ModelConfig(pretrained=str(base)))
    if scheduler is not None:  # before any weights load
        check_sampler(family_of(model), scheduler)
    if base is None:
        pipe, family = load_pipeline(model, DTYPES[dtype])
    else:
        base = model
        if embeds is not None and run_dir is None:  # a run's embedding is its own base's
            check_embedding_kind(base, embeds)
        pipe, family = load_pipeline(base, DTYPES[dtype])
        with quiet_libraries():
            if embeds is None:  # the base model alone: `{}` is the category word (a reference without the concept)
                concept = category
            elif Path(embeds).suffix in (".bin", ".pt"):  # older files: tensors only, never arbitrary pickled objects
                pipe.load_textual_inversion(torch.load(embeds, map_location="cpu", weights_only=True))
            else:  # the family's format (SDXL: a row for each encoder), under the run's placeholder
                family.load_embedding(pipe, embeds, cfg.data.placeholder if run_dir is not None else "<v>")
        for path in unet_weights:
            load_unet_weights(pipe, path)
    if embeds is not None or run_dir is not None:
        placeholder = next(t for t in pipe.tokenizer.get_added_vocab() if t not in pipe.tokenizer.all_special_tokens)
        concept = f"{placeholder} {category}"
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    label = f"{label}, random weights" if label in tiny_layouts() else label
    return pipe.to(device), concept, label
