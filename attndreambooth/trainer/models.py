"""The run's models, and what each stage trains by name: the [V] row(s), the cross-attention layers, the
whole denoiser, or a LoRA adapter's factors (the names also key checkpoints)."""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Models:
    """Everything a stage needs that stays across stages."""
    family: object  # families.Family: asked for everything the model family decides
    unet: nn.Module
    text_encoders: list  # in the family's conditioning order; [V] has a row in each
    noise_scheduler: object
    capture: object  # attention_reg.CrossAttentionCapture of the regularised layers, or None (regulariser off)
    input_ids: list  # the training prompt's token ids (1, 77), one tensor per tokenizer
    cond: object = None  # the cached conditioning once [V] is frozen (families.Conditioning)
    cache_text: bool = True  # False: run the text encoder every step (the released code; for benchmarks)
    prior_cond: object = None  # the class prompt's conditioning, with prior preservation (trainer/prior.py)


def row_name(index):
    """The checkpoint name of [V]'s row in the `index`-th text encoder: concept.row, concept.row_2, ..."""
    return "concept.row" if index == 0 else f"concept.row_{index + 1}"


def trainable_parameters(part, unet, text_encoders, family, adapter=None):
    """The parameters, by name, that a stage's `train` entry names: embedding ([V]'s row in each text encoder),
    cross_attention (the family's cross-attention layers), unet; with `adapter` (a LoRA stage) the U-Net parts
    are that adapter's factors; "lora" is every adapter's."""
    from attndreambooth.trainer.lora import adapter_parameters
    if part == "embedding":
        return {row_name(i): encoder.get_input_embeddings().row for i, encoder in enumerate(text_encoders)}
    if part == "lora" or (adapter is not None and part in ("cross_attention", "unet")):
        return {f"unet.{n}": p for n, p in adapter_parameters(unet, adapter).items()}
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if ".lora_" not in n}
    if part == "cross_attention":
        return {n: p for n, p in named.items() if family.is_cross_attention(n)}
    if part == "unet":
        return named
    raise ValueError(f"unknown trainable part {part!r}")


def trained_weights(parts, models, adapter=None):
    """The parameters of `parts` by name (names as in `trainable_parameters`, also checkpoint keys)."""
    return {n: p for part in parts
            for n, p in trainable_parameters(part, models.unet, models.text_encoders, models.family, adapter).items()}


@torch.no_grad()
def restore_weights(weights, models):
    """Copy checkpointed tensors back into the models."""
    params = trained_weights(("embedding", "unet", "lora"), models)
    for name, value in weights.items():
        params[name].copy_(value)


def set_trainable(planned, models):
    """Freeze everything, then unfreeze the parts the planned stage names (its adapter for a LoRA stage);
    returns the trainable parameters."""
    for model in (models.unet, *models.text_encoders):
        model.requires_grad_(False)
    params = trained_weights(planned.config.train, models, adapter=planned.name if planned.lora else None)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())
