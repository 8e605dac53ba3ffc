"""The transformer families' memory estimate: the saved-tensor count is exact on a hand-counted network, counts
attention as the fused kernels keep it, is the same on the meta device as on real tensors, predicts the SD 2.1
measurement it was not fitted to, and a card preset refuses a FLUX.1-dev plan over its card, naming what fits."""
import contextlib
import re

import pytest
import torch

import train_attndreambooth as T
from attndreambooth.families import by_name
from attndreambooth.trainer import saved_tensors
from attndreambooth.trainer.memory import SLACK
from attndreambooth.trainer.saved_tensors import denoiser_step, saved_bytes
from conftest import ROOT, SAMPLE

GIB = 2**30


def test_the_count_is_exact_on_a_hand_counted_network():
    """Linear-GELU-Linear, batch 2: a trained Linear keeps its input, GELU its input; a frozen Linear whose
    input needs a gradient keeps nothing (its weight is a parameter, never counted)."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.zeros(2, 8, requires_grad=True)
    assert saved_bytes(net, lambda: net(x))["total"] == 4 * (2 * 8 + 2 * 16 + 2 * 16)
    net.requires_grad_(False)
    assert saved_bytes(net, lambda: net(x))["total"] == 4 * (2 * 16)  # GELU's input alone
    blocks = saved_bytes(net, lambda: net(x), blocks=[net[1]])  # GELU checkpointed: its input kept, once
    assert blocks == dict(total=4 * 32, checkpointed=4 * 32 + 4 * 32)


def test_attention_is_counted_as_the_fused_kernels_keep_it():
    """q, k, v, the output and one fp32 log-sum-exp per query row, never the (N x M) probabilities."""
    q, k, v = (torch.zeros(1, 2, n, 8, requires_grad=True) for n in (64, 96, 96))
    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    stock = torch.nn.functional.scaled_dot_product_attention
    assert saved_bytes(torch.nn.Module(), call)["total"] == 4 * (64 * 8 + 96 * 8 + 96 * 8 + 64 * 8 + 64) * 2
    assert torch.nn.functional.scaled_dot_product_attention is stock  # put back afterwards


@pytest.mark.parametrize("part", [None, "cross_attention", "unet"])
def test_the_meta_count_equals_a_real_forward(part):
    """tiny-flux's step counted on the meta device equals the count on real tensors with the same attention
    count, and is within 5 % of a real CPU forward through torch's own attention kernel."""
    from diffusers import FluxTransformer2DModel

    from attndreambooth.families.source import tiny_model_dir
    flux, side = by_name("flux"), 16
    trains = {None: lambda n: False, "cross_attention": flux.is_cross_attention, "unet": lambda n: True}[part]
    load = lambda: FluxTransformer2DModel.from_pretrained(tiny_model_dir("tiny-flux"), subfolder="transformer")  # noqa

    def real(fused):
        model = load()
        for n, p in model.named_parameters():
            p.requires_grad_(p.dim() == 2 and trains(n))

        def call():
            cond = flux.shape_inputs(model, side)
            cond.hidden.requires_grad_()
            flux.predict(model, torch.zeros(1, flux.latent_channels(model), side, side, requires_grad=True),
                         torch.zeros(1), cond)
        with pytest.MonkeyPatch.context() as m:
            if not fused:
                m.setattr(saved_tensors, "fused_attention", contextlib.nullcontext)  # torch's own kernel
            return saved_bytes(model, call, flux.checkpointed_blocks(model))

    meta = denoiser_step(flux, load().to("meta"), side, torch.float32, trains)
    assert meta == real(fused=True) and meta["total"] > 0
    stock = real(fused=False)
    for key in ("total", "checkpointed"):
        assert stock[key] <= meta[key] <= 1.05 * stock[key]


def test_the_count_predicts_the_sd21_measurement_it_was_not_fitted_to():
    """SLACK is fitted on SD 2.1-base's step without checkpointing (8.73 GiB measured on an H100, bf16, batch
    8, 512 px); with checkpointing the count times SLACK lands within 5 % of the 1.47 GiB measured."""
    sd = by_name("sd")
    _, unet, _, _ = sd.meta_layout("stabilityai/stable-diffusion-2-1-base")
    blocks = [m for n, m in unet.named_modules()  # diffusers' checkpointing units in the U-Net
              if re.fullmatch(r"((down|up)_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+", n)]
    unet.to(torch.bfloat16).requires_grad_(True)
    x = torch.zeros(8, 4, 64, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    text = torch.zeros(8, 77, 1024, device="meta", dtype=torch.bfloat16)
    count = saved_bytes(unet, lambda: unet(x, torch.zeros(8, device="meta"), text), blocks)
    assert count["total"] * SLACK / GIB == pytest.approx(8.73, abs=0.01)
    assert count["checkpointed"] * SLACK / GIB == pytest.approx(1.47, rel=0.05)


def dry_run(tmp_path, *overrides):
    return T.main(["--config", str(ROOT / "configs/tiny-flux.yaml"), "model.pretrained=black-forest-labs/FLUX.1-dev",
                   f"data.instance_dir={SAMPLE}", "data.resolution=1024", f"output_dir={tmp_path}/run",
                   "runtime.mixed_precision=bf16", "runtime.memory=24gb", *overrides, "--dry_run"])


def test_a_card_preset_refuses_a_flux_plan_over_its_card_and_names_what_fits(tmp_path, capsys, monkeypatch):
    """FLUX.1-dev at 1024 px, batch 4 on a 24 GB card: refused in one line before anything loads, naming the
    batch size that fits (its peak as the estimate computes it at batch 1) and the card that fits; at batch 1
    the preset takes 8-bit frozen weights and the plan prints peaks under the card."""
    import diffusers
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", lambda *a, **k: pytest.fail("fetched"))
    with pytest.raises(SystemExit) as e:
        dry_run(tmp_path, *[f"stages.stage{i}.batch_size=4" for i in (1, 2, 3)])
    said = str(e.value.code)
    assert said.startswith("error: config key 'runtime.memory': 24gb leaves 21.6 GiB for training") and "\n" not in said
    at_one = float(re.search(r"at batch size 1 it would be (\d+\.\d) GiB", said).group(1))
    assert "use a larger card (48gb)" in said and not (tmp_path / "run").exists()
    one = [f"stages.stage{i}.batch_size=1" for i in (1, 2, 3)]
    with pytest.raises(SystemExit) as e:  # what would fit needs a setting changed: named
        dry_run(tmp_path, *one, "runtime.save_merged_pipeline=true")
    assert str(e.value.code).endswith("8-bit frozen weights would fit but the config rules it out: set "
                                      "runtime.save_merged_pipeline=false (a merged pipeline would hold the rounded "
                                      "weights)")
    dry_run(tmp_path, *one)
    out = capsys.readouterr().out
    peaks = [float(p) for p in re.findall(r"peak ~(\d+\.\d) GiB", out)]
    assert "quantize_base: int8" in out and max(peaks) == pytest.approx(at_one, abs=0.15) and max(peaks) <= 21.6
