"""Peak GPU memory of each stage, estimated from parameter and activation counts, and the card presets
(`runtime.memory=12gb|16gb|24gb`) that pick the least approximate way to train that fits the card.

The estimate: weights (fp32, or half precision for frozen ones) + gradients and AdamW state of what the
stage trains + activations. Activations are the summed outputs of the U-Net's leaf modules for one sample
at the run's resolution (a forward on the meta device), times the batch, times bytes per element fitted to
the one measurement there is: SD 2.1-base, 512 px, batch 8, bf16 autocast on an H100 (docs/gpu_results.md),
stage 3 peaks of 22.9 GiB (default) and 10.8 GiB (gradient checkpointing + 8-bit AdamW). Everything else
(SDXL, LoRA, half-precision weights) is extrapolated from it: estimated, until a GPU measures it.
"""
import logging
from dataclasses import dataclass

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


def activation_elements(unet, resolution, family):
    """Summed output elements of the U-Net's leaf modules for one sample at `resolution` px (meta device)."""
    total = [0]

    def count(module, args, out):
        if torch.is_tensor(out):
            total[0] += out.numel()

    leaves = [m for m in unet.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    side = resolution // 8
    try:
        with torch.device("meta"), torch.no_grad():
            c = unet.config
            unet(torch.zeros(1, c.in_channels, side, side), torch.zeros(1), torch.zeros(1, 77, c.cross_attention_dim),
                 **family.placeholder_inputs(unet, 1))
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


def fit_card(cfg, sizes, bitsandbytes):
    """The first way to train on LADDER whose estimated peak fits `runtime.memory`'s card; sets the runtime
    switches the config leaves unset (null) and, when it takes LoRA, a rank for the U-Net stages that have
    none (a rank set in the config stays). Returns (savers, peaks)."""
    from attndreambooth.config.plan import UNET_PARTS, Plan
    budget = CARDS[cfg.runtime.memory] * HEADROOM
    plan = Plan(cfg.stages)
    usable = [s for s in LADDER if (bitsandbytes or not s.optimizer_8bit)
              and (cfg.runtime.mixed_precision != "no" or not s.half_frozen_weights)]
    for savers in usable:
        peaks = stage_peaks(sizes, plan, savers, cfg.runtime.mixed_precision)
        if max(peaks.values()) <= budget:
            break
    else:
        log.warning("runtime.memory=%s: no way to train is estimated to fit %.1f GiB; the smallest needs %.1f GiB "
                    "(lower stages.<name>.batch_size or data.resolution%s)", cfg.runtime.memory, budget,
                    max(peaks.values()), ", or set runtime.mixed_precision=bf16" if cfg.runtime.mixed_precision == "no"
                    else "")
    r = cfg.runtime
    for key in ("gradient_checkpointing", "optimizer_8bit", "half_frozen_weights"):
        if getattr(r, key) is None:
            setattr(r, key, getattr(savers, key))
    for stage in cfg.stages.values():
        if savers.lora and not stage.lora_rank and UNET_PARTS & set(stage.train):
            stage.lora_rank = LORA_RANK
    return savers, peaks
