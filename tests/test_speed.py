"""The fast path computes what the released code's path computes; memory presets change memory only."""
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import train_attndreambooth as T
from attention_reg import CrossAttentionCapture
from bench.reference import ReferenceCapture
from attndreambooth.config.loading import load_config
from attndreambooth.config.schema import ConfigError
from attndreambooth.families import Conditioning, by_name
from attndreambooth.trainer.concept import add_concept_token, encode_prompt
from attndreambooth.trainer.data import encode_pixels
from attndreambooth.trainer.method import AttnDreamBoothLoss

SD = by_name("sd")
from conftest import ROOT, SAMPLE, tiny_overrides, script


def setup(pipe):
    token_id, cat_ids = add_concept_token(pipe.tokenizer, pipe.text_encoder, "<v>", "toy")
    ids, v, c = encode_prompt(pipe.tokenizer, "a photo of a <v> toy", token_id, cat_ids)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    eps, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    return ids, [v, c], pixels, eps, noise, torch.tensor([5, 500, 990])


def grads_of(params):
    return [p.grad.clone() for p in params]


def test_cached_latents_and_text_give_the_uncached_step(tiny_pipe):
    pipe = tiny_pipe
    ids, cols, pixels, eps, noise, t = setup(pipe)
    scale = pipe.vae.config.scaling_factor
    attn2 = [p for n, p in pipe.unet.named_parameters() if ".attn2." in n]
    with CrossAttentionCapture(pipe.unet, cols) as cap:
        objective = AttnDreamBoothLoss(SD, pipe.unet, [pipe.text_encoder], pipe.scheduler, cap, "per_layer")
        # uncached: the VAE and the text encoder run inside the step, on the whole batch
        dist = pipe.vae.encode(pixels).latent_dist
        terms = objective((dist.mean + dist.std * eps) * scale, noise, t, input_ids=[ids.repeat(3, 1)],
                          mean_weight=2.0, var_weight=5.0)
        terms["loss"].backward()
        uncached, uncached_grads = [x.item() for x in terms.values()], grads_of(attn2)
        pipe.unet.zero_grad(set_to_none=True)
        # cached: posterior from the pool (encoded 2 at a time), conditioning computed once
        mean, std = encode_pixels(pipe.vae, iter(pixels), "cpu", chunk=2)
        with torch.no_grad():
            cond = Conditioning(pipe.text_encoder(ids)[0])
        terms = objective((mean + std * eps) * scale, noise, t, cond=cond, mean_weight=2.0, var_weight=5.0)
        terms["loss"].backward()
    assert [x.item() for x in terms.values()] == pytest.approx(uncached, rel=1e-5)
    for a, b in zip(grads_of(attn2), uncached_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_capture_gives_the_eager_reference_loss(tiny_pipe):
    pipe = tiny_pipe
    ids, cols, pixels, eps, noise, t = setup(pipe)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = Conditioning(pipe.text_encoder(ids)[0])
    params = [p for n, p in pipe.unet.named_parameters() if ".attn2.to_k" in n or "conv_in" in n]
    results = []
    for capture_cls in (CrossAttentionCapture, ReferenceCapture):
        pipe.unet.zero_grad(set_to_none=True)
        with capture_cls(pipe.unet, cols) as cap:
            objective = AttnDreamBoothLoss(SD, pipe.unet, [pipe.text_encoder], pipe.scheduler, cap, "per_layer")
            loss, mse, _, mean_term, var_term, _ = objective(latents, noise, t, cond=cond, mean_weight=2.0,
                                                          var_weight=5.0).values()
            loss.backward()
            if capture_cls is ReferenceCapture:
                assert cap.full_maps[0].shape[-1] == 77  # the released code keeps every column
        results.append(([mse.item(), mean_term.item(), var_term.item()], grads_of(params)))
    (fast, fast_grads), (ref, ref_grads) = results
    assert fast == pytest.approx(ref, rel=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_low_memory_preset_changes_memory_not_results(tmp_path):
    """`low` = gradient checkpointing + 8-bit AdamW. 8-bit AdamW quantises the optimizer state, so it
    cannot give the same weights; it is switched off here to compare the rest exactly."""
    weights = []
    for name, preset in (("default", []), ("low", ["runtime.memory=low", "runtime.optimizer_8bit=false"])):
        T.main(["--config", str(ROOT / "configs/tiny.yaml")] + tiny_overrides(tmp_path / name) + preset)
        weights.append(load_file(next((tmp_path / name / "pipeline" / "unet").glob("*.safetensors"))))
    low_cfg = load_config(tmp_path / "low" / "config.yaml", check=False)
    assert low_cfg.runtime.gradient_checkpointing is True
    default, low = weights
    for k in default:
        torch.testing.assert_close(low[k], default[k], atol=1e-6, rtol=1e-5)


def test_memory_presets_resolve_and_8bit_needs_bitsandbytes(monkeypatch):
    base = ["output_dir=/tmp/unused", f"data.instance_dir={SAMPLE}", "data.category=toy"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="runtime.optimizer_8bit.*pip install bitsandbytes"):
        load_config(None, base + ["runtime.memory=low"])
    cfg = load_config(None, base + ["runtime.memory=low", "runtime.optimizer_8bit=false"])
    assert (cfg.runtime.gradient_checkpointing, cfg.runtime.optimizer_8bit) == (True, False)
    cfg = load_config(None, base)
    assert (cfg.runtime.gradient_checkpointing, cfg.runtime.optimizer_8bit) == (False, False)


def test_flop_count_matches_the_performance_budget():
    """docs/performance.md: a training step at batch 8 on SD 2.1-base is ~13.4 (stage 1), ~13.6 (stage 2) and
    ~19.3 TFLOP (stage 3) of U-Net work; counted here on the meta device, no weights."""
    benchmark = script("benchmark")
    flops = benchmark.model_flops("sd21", 8)
    got = [round(flops[s] / 1e12, 1) for s in ("stage1", "stage2", "stage3")]
    assert got == pytest.approx([13.4, 13.6, 19.3], abs=0.15)


@pytest.mark.slow
def test_benchmark_runs_reference_and_fast_side_by_side(tmp_path):
    benchmark = script("benchmark")
    out = tmp_path / "b.json"
    benchmark.main(["--variants", "reference,fast", "--repeats", "1", "--warmup", "0", "--steps", "1",
                    "--batch_size", "2", "--views", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["reference", "fast"]
    ref, fast = result["rows"]
    assert ref["setup_s"] == 0 and fast["setup_s"] > 0  # only the fast path encodes its pool once
    assert fast["speedup"] == pytest.approx(ref["schedule_s"] / fast["schedule_s"])
    assert "| fast | default | fp32 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_benchmark_times_sdxl_with_lora_and_half_precision_weights(tmp_path):
    """The SDXL layout (two text encoders, size/crop conditioning) through the trainer's train_stage, with
    LoRA stages over bf16 frozen weights; its FLOP count sees both encoders and the U-Net's extra inputs."""
    benchmark = script("benchmark")
    out = tmp_path / "b.json"
    benchmark.main(["--layout", "sdxl_small", "--variants", "fast", "--presets", "lora_half", "--precision", "bf16",
                    "--repeats", "1", "--warmup", "0", "--steps", "1", "--batch_size", "1", "--images", "1",
                    "--views", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert all(row[f"stage{i}_s_per_step"] > 0 for i in (1, 2, 3))
    flops = result["model_flops_per_step"]
    assert flops["stage3"] > max(flops["stage1"], flops["stage2"]) > 0  # stage 3: weight gradients everywhere
    assert "| fast | lora_half | bf16 |" in out.with_suffix(".md").read_text()
