"""Peak GPU memory of each stage, estimated from parameter and activation counts, and the card presets
(`runtime.memory=12gb|16gb|24gb|48gb|80gb`) that pick the least approximate way to train that fits the card.

The estimate: weights (fp32, half precision or 8 bits for frozen ones) + gradients and AdamW state of what the
stage trains + activations. The one measurement there is: SD 2.1-base, 512 px, batch 8, bf16 autocast on an
H100 (docs/reports/gpu_results.md), stage 3 peaks of 22.9 GiB (default) and 10.8 GiB (gradient checkpointing +
8-bit AdamW). Activations, two ways:
- U-Net families (SD, SDXL): the summed outputs of the U-Net's leaf modules for one sample (a forward on the
  meta device), times the batch, times bytes per element fitted to that measurement;
- transformer families (FLUX.1, SD3): the bytes autograd keeps, counted (trainer/saved_tensors.py), times
  SLACK, what the same count misses on the measurement (the allocator, what lives inside one operation).
Everything but SD 2.1 is extrapolated: estimated, until a GPU measures it.
"""
from dataclasses import dataclass, replace

import torch

from attndreambooth.config.schema import ConfigError


GIB = 2**30
CARDS = {"12gb": 12, "16gb": 16, "24gb": 24, "48gb": 48, "80gb": 80}  # GiB on the card
HEADROOM = 0.9  # of the card for the estimate: the CUDA context, the allocator's fragmentation
# Bytes per activation element, from the calibration run: SD 2.1-base's 431.25 M elements per 512 px sample,
# batch 8; its weights (U-Net 865.9 M + text encoder 340.4 M parameters, fp32) 4.49 GiB, stage 3's gradients
# 3.23 GiB and AdamW states 6.45 GiB (1.61 GiB in 8 bits): 22.9 - 14.17 = 8.73 GiB of activations without
# checkpointing, 10.8 - 9.33 = 1.47 GiB with it.
BYTES_PER_ACTIVATION = {False: 8.73 * GIB / (8 * 431.25e6), True: 1.47 * GIB / (8 * 431.25e6)}
LORA_RANK = 32  # the rank a card preset gives LoRA stages
# The saved-tensor count of SD 2.1-base's calibration step (bf16, batch 8) is 7.32 GiB without checkpointing
# and 1.28 GiB with it against 8.73 and 1.47 measured: the larger ratio, for both.
SLACK = 8.73 / 7.32


@dataclass(frozen=True)
class Savers:
    """One way to train: the memory savers it switches on."""
    gradient_checkpointing: bool = False
    optimizer_8bit: bool = False
    lora: bool = False  # U-Net stages train LoRA adapters (rank LORA_RANK unless set)
    half_frozen_weights: bool = False  # frozen weights in the autocast dtype
    quantized_base: bool = False  # frozen linear weights in 8 bits (runtime.quantize_base=int8, torchao)


LADDER = (  # least approximate first: the paper's full weights, then savers that change nothing but speed,
    Savers(),  # then 8-bit optimizer states, then LoRA, then half-precision, then 8-bit frozen weights
    Savers(gradient_checkpointing=True),
    Savers(gradient_checkpointing=True, optimizer_8bit=True),
    Savers(gradient_checkpointing=True, lora=True),
    Savers(gradient_checkpointing=True, lora=True, half_frozen_weights=True),
    Savers(gradient_checkpointing=True, lora=True, half_frozen_weights=True, quantized_base=True),
)


def activation_elements(unet, side, family):
    """Summed output elements of the U-Net's leaf modules for one sample of a `side`-wide latent (meta device)."""
    total = [0]

    def count(module, args, out):
        if torch.is_tensor(out):
            total[0] += out.numel()

    leaves = [m for m in unet.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.device("meta"), torch.no_grad():
            family.shape_call(unet, side)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def stage_peaks(sizes, plan, savers, mixed_precision):
    """{stage: estimated peak GiB} from preflight.memory_sizes (parameters, activations per sample, LoRA
    parameters per unit of rank)."""
    from attndreambooth.config.plan import UNET_PARTS
    from attndreambooth.trainer.lora import adapter_part
    half = savers.half_frozen_weights and mixed_precision != "no"
    full_unet = not savers.lora and any(UNET_PARTS & set(s.config.train) for s in plan)

    def frozen(params, linear):  # bytes of frozen weights; a trained U-Net is all fp32
        rest = 2 if half else 4
        return linear + (params - linear) * rest if savers.quantized_base else params * rest

    unet = sizes["unet"] * 4 if full_unet else frozen(sizes["unet"], sizes["unet_linear"])
    text = frozen(sizes["text"], sizes["text_linear"])
    peaks = {}
    for s in plan:
        train = set(s.config.train)
        if savers.lora and UNET_PARTS & train:
            trained = sizes["lora_per_rank"][adapter_part(s.config)] * (s.config.lora_rank or LORA_RANK)
            trained += sizes["embedding"] * ("embedding" in train)
        else:
            trained = sum(sizes[p] for p in train)
        states = trained * (4 + (2 if savers.optimizer_8bit else 8))
        if "saved" in sizes:  # counted (transformers); the text encoders are on the device only in a stage that
            # trains [V]'s rows, and for validation, which keeps no activations
            part = "unet" if "unet" in train else "cross_attention" if "cross_attention" in train else None
            kept = sizes["saved"][part]["checkpointed" if savers.gradient_checkpointing else "total"]
            on = "embedding" in train
            training = unet + states + SLACK * (s.config.batch_size * kept + on * sizes["text_saved"]) + on * text
            peaks[s.name] = max(training, unet + states + text) / GIB
        else:
            activations = s.config.batch_size * sizes["activations"] * BYTES_PER_ACTIVATION[
                savers.gradient_checkpointing]
            peaks[s.name] = (unet + text + states + activations) / GIB
    return peaks


def current_savers(cfg, plan=None):
    """The savers a resolved config switches on."""
    from attndreambooth.config.plan import Plan
    r = cfg.runtime
    return Savers(bool(r.gradient_checkpointing), bool(r.optimizer_8bit), (plan or Plan(cfg.stages)).lora,
                  bool(r.half_frozen_weights), bool(r.quantize_base))


def fixed_savers(cfg):
    """{saver: (value, the config keys that fix it)} for what the config sets itself: a runtime switch given
    explicitly, a quantisation format, or LoRA when a U-Net stage gives a rank (0: full weights)."""
    from attndreambooth.config.plan import UNET_PARTS
    fixed = {k: (v, [f"runtime.{k}={str(v).lower()}"]) for k in ("gradient_checkpointing", "optimizer_8bit",
             "half_frozen_weights") if (v := getattr(cfg.runtime, k)) is not None}
    if cfg.runtime.quantize_base:
        fixed["quantized_base"] = (True, [f"runtime.quantize_base={cfg.runtime.quantize_base}"])
    ranks = {name: s.lora_rank for name, s in cfg.stages.items()
             if s.lora_rank is not None and s.enabled and s.steps > 0 and UNET_PARTS & set(s.train)}
    if ranks:  # a mix of 0 and > 0 is refused by config.validate once the preset is resolved
        lora = max(ranks.values()) > 0
        fixed["lora"] = (lora, [f"stages.{n}.lora_rank={r}" for n, r in ranks.items() if (r > 0) == lora])
    return fixed


def fit_card(cfg, sizes, installed):
    """The first way to train on LADDER whose estimated peak fits `runtime.memory`'s card, with what the config
    sets itself kept (an explicit switch, a stage's lora_rank); sets the runtime switches the config leaves
    unset (null) and the ranks of the U-Net stages that have none (LORA_RANK when it takes LoRA, else 0).
    `installed`: {"bitsandbytes": bool, "torchao": bool}, the optional packages 8-bit AdamW and 8-bit weights
    need. A card preset never starts a plan estimated over its card: ConfigError, naming what would fit.
    Returns (savers, peaks) of what will run."""
    from attndreambooth.config.plan import UNET_PARTS, Plan
    budget, plan, fixed = CARDS[cfg.runtime.memory] * HEADROOM, Plan(cfg.stages), fixed_savers(cfg)
    possible, usable = ladder(cfg, installed)
    ways = [w for w in dict.fromkeys(replace(s, **{k: v for k, (v, _) in fixed.items()}) for s in usable)
            if w.lora or not w.quantized_base]  # 8-bit weights only under LoRA (config.validate)
    peak = {s: max(stage_peaks(sizes, plan, s, cfg.runtime.mixed_precision).values()) for s in {*possible, *ways}}
    savers = next((w for w in ways if peak[w] <= budget), ways[-1])
    if peak[savers] > budget:
        raise ConfigError(f"config key 'runtime.memory': {unfit(cfg, sizes, savers, peak, usable, possible, fixed)}")
    r = cfg.runtime
    for key in ("gradient_checkpointing", "optimizer_8bit", "half_frozen_weights"):
        if getattr(r, key) is None:
            setattr(r, key, getattr(savers, key))
    if savers.quantized_base and not r.quantize_base:
        r.quantize_base = "int8"
    for stage in cfg.stages.values():
        if stage.lora_rank is None:
            stage.lora_rank = LORA_RANK if savers.lora and UNET_PARTS & set(stage.train) else 0
    return savers, stage_peaks(sizes, plan, savers, cfg.runtime.mixed_precision)


def ladder(cfg, installed):
    """The ways on LADDER the config allows, and of those the ones whose optional packages are installed."""
    possible = [s for s in LADDER if (cfg.runtime.mixed_precision != "no" or not s.half_frozen_weights)
                and not (s.quantized_base and cfg.runtime.save_merged_pipeline)]
    return possible, [s for s in possible if (installed["bitsandbytes"] or not s.optimizer_8bit)
                      and (installed["torchao"] or not s.quantized_base)]


def card_summary(cfg, sizes, installed):
    """What each card preset alone would take for this plan, with its estimated peak (for --dry_run)."""
    from attndreambooth.config.plan import Plan
    plan, (_, usable), said = Plan(cfg.stages), ladder(cfg, installed), []
    peak = {s: max(stage_peaks(sizes, plan, s, cfg.runtime.mixed_precision).values()) for s in usable}
    for card, gib in CARDS.items():
        way = next((s for s in usable if peak[s] <= gib * HEADROOM), None)
        said.append(f"{card}: {describe(way)} (~{peak[way]:.1f} GiB)" if way else
                    f"{card}: nothing fits (smallest ~{min(peak.values()):.1f} GiB)")
    return "  card presets (runtime.memory=...), each alone: " + "; ".join(said)


def unfit(cfg, sizes, savers, peak, usable, possible, fixed):
    """Why no way fits the card, and what would: the explicit settings in the way, a package to install, a
    setting that rules a saver out, a smaller batch, a larger card."""
    from attndreambooth.config.plan import Plan
    card, budget, precision = cfg.runtime.memory, CARDS[cfg.runtime.memory] * HEADROOM, cfg.runtime.mixed_precision
    says = f"{card} leaves {budget:.1f} GiB for training, and the plan is estimated at {peak[savers]:.1f} GiB"
    free = next((s for s in usable if peak[s] <= budget), None)
    if free:
        blame = [key for k, (v, keys) in fixed.items() if getattr(free, k) != v for key in keys]
        return (f"{says} with {' and '.join(blame)}, set in the config; without {'it' if len(blame) == 1 else 'them'} "
                f"the preset would take {describe(free)} ({peak[free]:.1f} GiB): remove {' and '.join(blame)}, or set "
                "runtime.memory=default to run the config as written")
    fits = [s for s in possible if peak[s] <= budget]
    if fits:
        need = "pip install bitsandbytes" if fits[0].optimizer_8bit else "pip install torchao"
        return f"{says}; {describe(fits[0])} would fit ({peak[fits[0]]:.1f} GiB) but needs a package: {need}"
    ruled_out = [s for s in LADDER if s not in possible
                 and max(stage_peaks(sizes, Plan(cfg.stages), s, "bf16").values()) <= budget]
    if ruled_out:
        key = ("runtime.save_merged_pipeline=false (a merged pipeline would hold the rounded weights)"
               if ruled_out[0].quantized_base and cfg.runtime.save_merged_pipeline else "runtime.mixed_precision=bf16")
        return f"{says}; {describe(ruled_out[0])} would fit but the config rules it out: set {key}"
    larger = next((c for c, gib in CARDS.items() if gib * HEADROOM >= peak[savers]), None)
    other = (", or lower data.resolution" + (f", or use a larger card ({larger})" if larger else "")
             + (", or set runtime.mixed_precision=bf16" if precision == "no" else ""))
    if max(s.batch_size for s in cfg.stages.values()) > 1:
        one = {n: replace(s, batch_size=1) for n, s in cfg.stages.items()}
        at_one = max(stage_peaks(sizes, Plan(one), savers, precision).values())
        return (f"{says} with every memory saver ({describe(savers)}); at batch size 1 it would be {at_one:.1f} "
                f"GiB: set stages.<name>.batch_size=1{other}")
    return f"{says} with every memory saver ({describe(savers)}) at batch size 1: {other[5:]}"


def describe(savers, ranks=()):
    """The savers a way to train switches on, in words for the log (`ranks`: the LoRA stages' ranks)."""
    words = {"gradient_checkpointing": "gradient checkpointing", "optimizer_8bit": "8-bit AdamW",
             "lora": "LoRA" + (f" rank {'/'.join(map(str, ranks))}" if ranks else ""),
             "half_frozen_weights": "half-precision frozen weights", "quantized_base": "8-bit frozen weights"}
    return ", ".join(words[k] for k, v in vars(savers).items() if v) or "no memory savers"
