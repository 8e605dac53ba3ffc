"""runtime.quantize_base: frozen base weights stored in 8 bits (torchao, weight-only), under LoRA stages."""
import importlib.util

import pytest
import torch
from safetensors.torch import load_file

import train_attndreambooth as T
from conftest import ROOT, tiny_overrides

LORA = {"stages.stage2.lora_rank": 4, "stages.stage3.lora_rank": 4}


def test_int8_keeps_each_weight_within_half_a_step_of_its_row_scale():
    """Weight-only int8 with one scale per output row: every stored weight is within half a quantisation step
    (max |w| of its row / 127 / 2) of the original, every linear layer is converted, and the model still runs."""
    from diffusers import FluxTransformer2DModel

    from attndreambooth.families.flux import TINY_TRANSFORMER
    from attndreambooth.trainer.quantise import quantise_frozen
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_TRANSFORMER)
    linear = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantise_frozen([model], "int8") == len(linear) > 20
    for name, module in model.named_modules():
        if name in linear:
            w, step = linear[name], linear[name].abs().amax(1, keepdim=True) / 127
            stored = module.weight.dequantize()  # a plain tensor has no dequantize: the layer was converted
            assert ((stored - w).abs() <= step / 2 + 1e-6).all(), name


@pytest.mark.slow
def test_quantised_lora_runs_train_the_same_modules_and_load_over_the_original_base(tmp_path):
    """The LoRA files of runs over int8 and fp8 base weights name the same modules as one over fp32 weights,
    their factors differ (the base they trained against was rounded), and they load over the original base in
    stock diffusers; no pipeline is written."""
    from diffusers import FluxPipeline

    from attndreambooth.families.source import tiny_model_dir
    outs = {}
    for q in (None, "int8", "fp8"):
        extra = {"runtime.quantize_base": q} if q else {}
        outs[q] = T.main(["--config", str(ROOT / "configs/tiny-flux.yaml"), "runtime.tensorboard=false",
                          *tiny_overrides(tmp_path / str(q), **LORA, **extra)])
    plain = load_file(outs[None] / "pytorch_lora_weights.safetensors")
    for fmt in ("int8", "fp8"):
        rounded = load_file(outs[fmt] / "pytorch_lora_weights.safetensors")
        assert plain.keys() == rounded.keys() and any(not torch.equal(plain[k], rounded[k]) for k in plain)
        assert not (outs[fmt] / "pipeline").exists()
        stock = FluxPipeline.from_pretrained(tiny_model_dir("tiny-flux"))
        stock.load_lora_weights(str(outs[fmt]))
        assert any(hasattr(m, "lora_A") for m in stock.transformer.modules())


@pytest.mark.parametrize("override, message", [
    ({}, "stores the frozen base weights in int8, so the denoiser must be trained through LoRA stages (stage2, "
         "stage3 train its own weights: give them stages.<name>.lora_rank > 0)"),
    ({**LORA, "runtime.save_merged_pipeline": "true"}, "a merged pipeline would hold the rounded base weights"),
    ({**LORA, "runtime.quantize_base": "int4"}, "'int4' is not null or one of ('int8', 'fp8')"),
])
def test_quantised_base_weights_are_refused_where_they_cannot_work(tmp_path, override, message):
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny-flux.yaml"),
                *tiny_overrides(tmp_path / "run", **{"runtime.quantize_base": "int8", **override})])
    assert "config key 'runtime.quantize_base'" in str(e.value.code) and message in str(e.value.code)
    assert not (tmp_path / "run").exists()


def test_without_torchao_the_key_is_refused_in_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny-flux.yaml"),
                *tiny_overrides(tmp_path / "run", **{"runtime.quantize_base": "fp8", **LORA})])
    assert str(e.value.code) == ("error: config key 'runtime.quantize_base': fp8 weights need torchao: pip install "
                                 "torchao, or remove the key")
