"""Frozen base weights in 8 bits (`runtime.quantize_base`): the denoiser's and the text encoders' linear layers
stored weight-only in torchao's int8 (per-row scales) or fp8 (e4m3) format, which halves their memory against
bf16 and quarters it against fp32 (FLUX.1-dev's 11.9 B-parameter transformer: ~11 GiB in 8 bits). Activations,
LoRA factors and [V]'s row stay in their own precision; peft wraps a quantised layer in its torchao LoRA layer.

Only weights no stage trains can be stored so: the run's denoiser stages must be LoRA stages, and no merged
pipeline is written (it would hold the rounded weights); the LoRA file and the embedding are the outputs, to be
loaded over the original base. torchao is an optional extra (pip install torchao)."""


def quantise_frozen(models, fmt):
    """Store every linear layer's weight of `models` in `fmt` (in place); returns how many layers."""
    import torch
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    config = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[fmt]()
    count = 0
    for model in models:
        count += sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        quantize_(model, config)
    return count
