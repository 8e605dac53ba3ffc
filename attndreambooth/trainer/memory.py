"""Peak GPU memory of each stage, estimated from parameter and activation counts, and the card presets
(`runtime.memory=12gb|16gb|24gb`) that pick the least approximate way to train that fits the card.

The estimate: weights (fp32, or half precision for frozen ones) + gradients and AdamW state of what the
stage trains + activations. Activations are the summed outputs of the U-Net's leaf modules for one sample
at the run's resolution (a forward on the meta device), times the batch, times bytes per element fitted to
the one measurement there is: SD 2.1-base, 512 px, batch 8, bf16 autocast on an H100 (docs/reports/gpu_results.md),
stage 3 peaks of 22.9 GiB (default) and 10.8 GiB (gradient checkpointing + 8-bit AdamW). Everything else
(SDXL, LoRA, half-precision weights) is extrapolated from it: estimated, until a GPU measures it.
"""
import logging
from dataclasses import dataclass, replace

import torch


log = logging.getLogger(__name__)
GIB = 2**30
CARDS = {"12gb": 12, "16gb": 16, "24gb": 24}  # GiB on the card
HEADROOM = 0.9  # of the card for the estimate: the CUDA context, the allocator's fragmentation
# Bytes per activation element, from the calibration run: SD 2.1-base's 431.25 M elements per 512 px sample,
# batch 8; its weights (U-Net 865.9 M + text encoder 340.4 M parameters, fp32) 4.49 GiB, stage 3's gradients
# 3.23 GiB and AdamW states 6.45 GiB (1.61 GiB in 8 bits): 22.9 - 14.17 = 8.73 GiB of activations without
# checkpointing, 10.8 - 9.33 = 1.47 GiB with it.
BYTES_PER_ACTIVATION = {False: 8.73 * GIB / (8 * 431.25e6), True: 1.47 * GIB / (8 * 431.25e6)}
LORA_RANK = 32  # the rank a card preset gives LoRA stages


@dataclass(frozen=True)
class Savers:
    """One way to train: the memory savers it switches on."""
    gradient_checkpointing: bool = False
    optimizer_8bit: bool = False
    lora: bool = False  # U-Net stages train LoRA adapters (rank LORA_RANK unless set)
    half_frozen_weights: bool = False  # frozen weights in the autocast dtype


LADDER = (  # least approximate first: the paper's full weights, then savers that change nothing but speed,
    Savers(),  # then 8-bit optimizer states, then LoRA, then half-precision frozen weights
    Savers(gradient_checkpointing=True),
    Savers(gradient_checkpointing=True, optimizer_8bit=True),
    Savers(gradient_checkpointing=True, lora=True),
    Savers(gradient_checkpointing=True, lora=True, half_frozen_weights=True),
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
    weights = sizes["unet"] * (2 if half and not full_unet else 4) + sizes["text"] * (2 if half else 4)
    peaks = {}
    for s in plan:
        train = set(s.config.train)
        if savers.lora and UNET_PARTS & train:
            trained = sizes["lora_per_rank"][adapter_part(s.config)] * (s.config.lora_rank or LORA_RANK)
            trained += sizes["embedding"] * ("embedding" in train)
        else:
            trained = sum(sizes[p] for p in train)
        optimizer = 2 if savers.optimizer_8bit else 8
        activations = s.config.batch_size * sizes["activations"] * BYTES_PER_ACTIVATION[savers.gradient_checkpointing]
        peaks[s.name] = (weights + trained * (4 + optimizer) + activations) / GIB
    return peaks


def current_savers(cfg, plan=None):
    """The savers a resolved config switches on."""
    from attndreambooth.config.plan import Plan
    r = cfg.runtime
    return Savers(bool(r.gradient_checkpointing), bool(r.optimizer_8bit), (plan or Plan(cfg.stages)).lora,
                  bool(r.half_frozen_weights))


def fixed_savers(cfg):
    """{saver: (value, the config keys that fix it)} for what the config sets itself: a runtime switch given
    explicitly, or LoRA when a U-Net stage gives a rank (0: full weights)."""
    from attndreambooth.config.plan import UNET_PARTS
    fixed = {k: (v, [f"runtime.{k}={str(v).lower()}"]) for k in ("gradient_checkpointing", "optimizer_8bit",
             "half_frozen_weights") if (v := getattr(cfg.runtime, k)) is not None}
    ranks = {name: s.lora_rank for name, s in cfg.stages.items()
             if s.lora_rank is not None and s.enabled and s.steps > 0 and UNET_PARTS & set(s.train)}
    if ranks:  # a mix of 0 and > 0 is refused by config.validate once the preset is resolved
        lora = max(ranks.values()) > 0
        fixed["lora"] = (lora, [f"stages.{n}.lora_rank={r}" for n, r in ranks.items() if (r > 0) == lora])
    return fixed


def fit_card(cfg, sizes, bitsandbytes):
    """The first way to train on LADDER whose estimated peak fits `runtime.memory`'s card, with what the config
    sets itself kept (an explicit switch, a stage's lora_rank); sets the runtime switches the config leaves
    unset (null) and the ranks of the U-Net stages that have none (LORA_RANK when it takes LoRA, else 0).
    When nothing fits, a warning names the explicit settings that keep the preset from a way that would.
    Returns (savers, peaks) of what will run."""
    from attndreambooth.config.plan import UNET_PARTS, Plan
    budget, plan, fixed = CARDS[cfg.runtime.memory] * HEADROOM, Plan(cfg.stages), fixed_savers(cfg)
    usable = [s for s in LADDER if (bitsandbytes or not s.optimizer_8bit)
              and (cfg.runtime.mixed_precision != "no" or not s.half_frozen_weights)]
    peak = {s: max(stage_peaks(sizes, plan, s, cfg.runtime.mixed_precision).values()) for s in usable}
    ways = list(dict.fromkeys(replace(s, **{k: v for k, (v, _) in fixed.items()}) for s in usable))
    for way in ways:
        peak.setdefault(way, max(stage_peaks(sizes, plan, way, cfg.runtime.mixed_precision).values()))
    savers = next((w for w in ways if peak[w] <= budget), ways[-1])
    if peak[savers] > budget:
        free = next((s for s in usable if peak[s] <= budget), None)
        blame = [key for k, (v, keys) in fixed.items() if free and getattr(free, k) != v for key in keys]
        if blame:
            log.warning("runtime.memory=%s: %s, set in the config, %s the plan (estimated peak %.1f GiB) from "
                        "fitting the card's %.1f GiB; the preset alone would take %s (%.1f GiB): remove %s",
                        cfg.runtime.memory, " and ".join(blame), "keeps" if len(blame) == 1 else "keep", peak[savers],
                        budget, describe(free), peak[free], "it" if len(blame) == 1 else "them")
        else:
            log.warning("runtime.memory=%s: no way to train is estimated to fit %.1f GiB; the smallest needs %.1f "
                        "GiB (lower stages.<name>.batch_size or data.resolution%s)", cfg.runtime.memory, budget,
                        peak[savers], ", or set runtime.mixed_precision=bf16" if cfg.runtime.mixed_precision == "no"
                        else "")
        if not bitsandbytes:
            with_8bit = next((w for w in (replace(s, optimizer_8bit=True) for s in ways) if "optimizer_8bit" not in
                              fixed and max(stage_peaks(sizes, plan, w, cfg.runtime.mixed_precision).values()) <= budget),
                             None)
            if with_8bit:
                log.warning("runtime.memory=%s: with bitsandbytes installed (pip install bitsandbytes) the preset "
                            "could take %s, estimated to fit", cfg.runtime.memory, describe(with_8bit))
    r = cfg.runtime
    for key in ("gradient_checkpointing", "optimizer_8bit", "half_frozen_weights"):
        if getattr(r, key) is None:
            setattr(r, key, getattr(savers, key))
    for stage in cfg.stages.values():
        if stage.lora_rank is None:
            stage.lora_rank = LORA_RANK if savers.lora and UNET_PARTS & set(stage.train) else 0
    return savers, stage_peaks(sizes, plan, savers, cfg.runtime.mixed_precision)


def describe(savers, ranks=()):
    """The savers a way to train switches on, in words for the log (`ranks`: the LoRA stages' ranks)."""
    words = {"gradient_checkpointing": "gradient checkpointing", "optimizer_8bit": "8-bit AdamW",
             "lora": "LoRA" + (f" rank {'/'.join(map(str, ranks))}" if ranks else ""),
             "half_frozen_weights": "half-precision frozen weights"}
    return ", ".join(words[k] for k, v in vars(savers).items() if v) or "no memory savers"
