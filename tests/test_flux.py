"""FLUX.1: the built-in tiny FLUX.1-shaped model (double- and single-stream blocks, guidance input, T5 and
CLIP-L) trains the three stages through the same trainer; each stage trains what it claims; the flow-matching
term and Eq. 2 on the joint-attention maps equal independent computations; the outputs load in stock
FluxPipeline with the documented calls; bad options are refused before any weights load."""
import pytest
import torch
from safetensors.torch import load_file

import train_attndreambooth as T
from conftest import ROOT, tiny_overrides
from test_joint_maps import ExplicitFlux

PROMPT = "a photo of a <v> toy"


def flux_run(out, **overrides):
    return T.main(["--config", str(ROOT / "configs/tiny-flux.yaml"), "runtime.tensorboard=false",
                   *tiny_overrides(out, **overrides)])


@pytest.fixture(scope="module")
def base():
    from diffusers import FluxPipeline

    from attndreambooth.families.source import tiny_model_dir
    return FluxPipeline.from_pretrained(tiny_model_dir("tiny-flux"))


def snapshot(models):
    """Every weight a stage could move: the transformer's, and [V]'s row and the frozen rows of each encoder."""
    state = {f"transformer.{n}": p.detach().clone() for n, p in models.unet.named_parameters()}
    for i, encoder in enumerate(models.text_encoders):
        emb = encoder.get_input_embeddings()
        state[f"row{i}"], state[f"rows{i}"] = emb.row.detach().clone(), emb.base.weight.detach().clone()
    return state


def run_with_stage_snapshots(run, out):
    """`run(out)` with the weights snapshotted before the first stage and after each: (run folder, states)."""
    import attndreambooth.trainer.method as method
    states, train_stage = [], method.train_stage

    def recording(planned, models, *args, **kwargs):
        states.append(snapshot(models)) if not states else None
        result = train_stage(planned, models, *args, **kwargs)
        states.append(snapshot(models))
        return result
    with pytest.MonkeyPatch.context() as m:
        m.setattr(method, "train_stage", recording)
        return run(out), states


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A tiny FLUX.1 run with the weights before and after each stage."""
    return run_with_stage_snapshots(flux_run, tmp_path_factory.mktemp("flux") / "run")


def ids_of(pipe, prompt):
    """Token ids as FluxPipeline pads them: CLIP-L's 77, T5's 512."""
    return [t(prompt, padding="max_length", max_length=n, return_tensors="pt").input_ids
            for t, n in ((pipe.tokenizer, 77), (pipe.tokenizer_2, 512))]


def changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_tiny_flux_has_the_flux_structure(base):
    from attndreambooth.families import Flux
    t = base.transformer
    assert len(t.transformer_blocks) == 2 and len(t.single_transformer_blocks) == 2 and t.config.guidance_embeds
    assert type(base.text_encoder_2).__name__ == "T5EncoderModel" and base.tokenizer_2.model_max_length == 512
    assert t.config.joint_attention_dim == base.text_encoder_2.config.d_model
    assert base.tokenizer_2.tokenize("a photo of a toy") == ["▁a", "▁photo", "▁of", "▁a", "▁toy"]  # whole words
    layers = Flux().cross_attention_layers(t)
    assert list(layers) == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor",
                            "single_transformer_blocks.0.attn.processor", "single_transformer_blocks.1.attn.processor"]


def test_each_stage_trains_what_it_claims_and_v_moves_only_in_stage1(staged):
    from attndreambooth.families import Flux
    out, (before, after1, after2, after3) = staged
    assert (out / "finished.json").is_file()
    transformer = {k for k in before if k.startswith("transformer.")}
    assert changed(before, after1) == {"row0", "row1"}  # [V]'s rows in CLIP-L and T5, nothing else
    stage2 = changed(after1, after2)
    claimed = {k for k in transformer if Flux().is_cross_attention(k)}
    assert stage2 <= claimed and {k.split(".")[-2] for k in stage2} >= {"to_q", "add_k_proj", "add_v_proj", "0"}
    assert not any(k.startswith("transformer.single_") for k in claimed)  # double-stream blocks only
    stage3 = changed(after2, after3)
    assert stage3 <= transformer and len(stage3) > 0.9 * len(transformer)  # the whole transformer, no row
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in stage3)


def test_the_flow_matching_term_equals_an_independent_computation(base):
    """diffusers' Flux objective written out here: sigma = t / 1000, noisy = (1 - sigma) x + sigma e, the
    transformer on 2x2 patches with guidance 1 and T5 / CLIP-L conditioning, MSE against e - x."""
    from attndreambooth.families import Flux
    from attndreambooth.trainer.method import AttnDreamBoothLoss
    family, pipe = Flux(), base
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([250.0, 900.0])
    ids = ids_of(pipe, PROMPT.replace("<v> ", ""))
    loss = AttnDreamBoothLoss(family, pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2],
                              family.training_scheduler(pipe.scheduler.config), None, "per_layer")
    with torch.no_grad():
        got = loss(x, e, t, input_ids=ids)["mse"]
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPT.replace("<v> ", ""), prompt_2=None)
        s = (t / 1000).view(-1, 1, 1, 1)
        noisy = (1 - s) * x + s * e
        tokens = noisy.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 16)  # (B, 4x4, C*2*2)
        image_ids = torch.tensor([[0.0, i, j] for i in range(4) for j in range(4)])
        pred = pipe.transformer(hidden_states=tokens, timestep=t / 1000, guidance=torch.ones(2),
                                pooled_projections=pooled.expand(2, -1), encoder_hidden_states=embeds.expand(2, -1, -1),
                                txt_ids=text_ids, img_ids=image_ids).sample
        pred = pred.reshape(2, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 8, 8)
        want = ((pred - (e - x)) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("joint_map", ["text", "joint"])
def test_eq2_on_the_joint_maps_equals_an_independent_computation(base, joint_map):
    """Eq. 2 (per-layer reduction) from the explicit softmax of every double-stream block, [V] at T5 token 4
    and the category at 5, against the trainer's capture inside the loss."""
    from attndreambooth.config.schema import RegConfig
    from attndreambooth.families import Flux
    from attndreambooth.trainer.method import AttnDreamBoothLoss
    family, pipe = Flux(), base
    reg = RegConfig(joint_map=joint_map)
    layers = list(family.map_layers(pipe.transformer, reg))
    capture = family.capture(pipe.transformer, [4, 5], layers, reg, text_len=512)
    g = torch.Generator().manual_seed(1)
    x, e, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 700.0])
    ids = ids_of(pipe, PROMPT.replace("<v>", "red"))
    loss = AttnDreamBoothLoss(family, pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2],
                              family.training_scheduler(pipe.scheduler.config), capture, "per_layer")
    with torch.no_grad(), capture:
        got = loss(x, e, t, input_ids=ids, mean_weight=2.0, var_weight=5.0)
    explicit = ExplicitFlux(512)
    processors = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor({n: explicit if n in layers else p for n, p in processors.items()})
    try:
        with torch.no_grad():
            cond = family.encode([pipe.text_encoder, pipe.text_encoder_2], ids)
            noisy, _ = family.noised(loss.noise_scheduler, x, e, t)
            family.predict(pipe.transformer, noisy, t, cond.expand(2))
    finally:
        pipe.transformer.set_attn_processor(processors)
    means, variances = [], []
    for probs in explicit.probs:  # (B, heads, text + image, text + image)
        rows = probs[:, :, 512:].double()
        if joint_map == "text":
            rows = rows / rows[..., :512].sum(-1, keepdim=True)
        v, c = rows[..., 4].flatten(1), rows[..., 5].flatten(1)
        means.append(((v.mean(1) - c.mean(1)) ** 2).sum())
        variances.append(((v.var(1) - c.var(1)) ** 2).sum())
    want = 2.0 * torch.stack(means).mean() + 5.0 * torch.stack(variances).mean()
    assert len(explicit.probs) == 2 and want > 0
    torch.testing.assert_close(got["reg"].double(), want, rtol=1e-4, atol=0)


def test_the_run_loads_in_stock_flux_pipeline_and_the_embedding_with_the_documented_calls(staged, base):
    from diffusers import FluxPipeline

    from attndreambooth.families.source import tiny_model_dir
    out, _ = staged
    trained = FluxPipeline.from_pretrained(out / "pipeline")  # default arguments
    image = trained(PROMPT, height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    stock = FluxPipeline.from_pretrained(tiny_model_dir("tiny-flux"))
    state = load_file(out / "learned_embeds.safetensors")  # the calls docs/inference.md gives
    stock.load_textual_inversion(state["clip_l"], token="<v>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(state["t5"], token="<v>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    with torch.no_grad():
        want, got = trained.encode_prompt(PROMPT, prompt_2=None), stock.encode_prompt(PROMPT, prompt_2=None)
    for w, g in zip(want[:2], got[:2]):
        torch.testing.assert_close(w, g, atol=1e-6, rtol=1e-6)
    category = stock.text_encoder_2.get_input_embeddings().weight[stock.tokenizer_2.convert_tokens_to_ids("▁toy")]
    assert not torch.allclose(state["t5"][0], category)  # trained away from its start


def comfyui_flux_lora_modules(double, single):
    """The LoRA module names ComfyUI applies to a FLUX.1 model from a diffusers-format file: "transformer." +
    each diffusers module its FLUX.1 key table maps onto Black Forest Labs' weights (comfy/utils.py
    `flux_to_diffusers`, read by comfy/lora.py `model_lora_keys_unet`), linear layers only."""
    per_double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                  "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
                  "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    per_single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
    return ({f"transformer.transformer_blocks.{i}.{m}" for i in range(double) for m in per_double}
            | {f"transformer.single_transformer_blocks.{i}.{m}" for i in range(single) for m in per_single})


@pytest.mark.slow
def test_the_flux_lora_file_rebuilds_the_transformer_in_stock_diffusers(tmp_path, base):
    from diffusers import FluxPipeline

    from attndreambooth.families.source import tiny_model_dir
    out = flux_run(tmp_path / "lora", **{"stages.stage2.lora_rank": 4, "stages.stage3.lora_rank": 4,
                                         "runtime.save_merged_pipeline": "true"})
    merged = FluxPipeline.from_pretrained(out / "pipeline")
    stock = FluxPipeline.from_pretrained(tiny_model_dir("tiny-flux"))
    stock.load_lora_weights(str(out))
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    modules = {k.split(".lora_")[0] for k in keys}
    assert {k.split(".lora_")[1] for k in keys} == {"A.weight", "B.weight"} and len(keys) == 2 * len(modules)
    assert modules <= comfyui_flux_lora_modules(double=2, single=2)  # every module ComfyUI maps, none it drops
    assert {m.split(".")[1] for m in modules} == {"transformer_blocks", "single_transformer_blocks"}
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.tensor([0.4]),
                  guidance=torch.ones(1), pooled_projections=torch.randn(1, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g), txt_ids=torch.zeros(512, 3),
                  img_ids=torch.tensor([[0.0, i, j] for i in range(4) for j in range(4)]))
    with torch.no_grad():
        torch.testing.assert_close(merged.transformer(**inputs).sample, stock.transformer(**inputs).sample,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_killed_flux_run_resumes_to_the_same_weights(tmp_path):
    from test_resume import straight_and_killed
    want, got = straight_and_killed(tmp_path, ["stage2:2"], **{"model.pretrained": "tiny-flux"})
    assert {"clip_l", "t5"} <= {k.split("/")[-1] for k in want}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("override, message", [
    ({"data.resolution": 72}, "config key 'data.resolution': 72 is not a multiple of this model's VAE factor times "
                              "patch, 16 (the latent would be cut); use 64 or 80"),
    ({"reg.map_sizes": "[4]"}, "config key 'reg.map_sizes': [4] is an option of the U-Net models (SD, SDXL) that a "
                               "FLUX.1 model does not have; remove it (or set it to None)"),
    ({"runtime.channels_last": "true"}, "config key 'runtime.channels_last': True is an option of the U-Net models"),
    ({"prior.enabled": "true", "prior.class_prompt": "a toy"}, "config key 'prior.enabled': True is an option"),
])
def test_options_flux_cannot_honour_are_refused_before_weights_load(tmp_path, monkeypatch, override, message):
    import attndreambooth.families.source as source
    monkeypatch.setattr(source, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit) as e:
        flux_run(tmp_path / "run", **override)
    assert message in str(e.value.code) and not (tmp_path / "run").exists()


def test_a_guidance_value_for_a_model_without_a_guidance_input_is_refused(tmp_path, monkeypatch):
    import attndreambooth.families.source as source
    monkeypatch.setattr(source, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny.yaml"), "model.guidance=3.5", *tiny_overrides(tmp_path / "r")])
    assert str(e.value.code).endswith("config key 'model.guidance': 3.5 is given but this model has no guidance input "
                                      "(only guidance-distilled models such as FLUX.1-dev have one); remove the key")


def test_infer_draws_per_token_joint_attention_maps_on_a_flux_run(staged, tmp_path):
    """The paper's Fig. 2 on an MMDiT: one map per T5 token, from the double-stream blocks' joint attention
    renormalised over the text keys, so at every pixel the 512 text tokens' weights sum to 1."""
    import numpy as np

    from attndreambooth.inference.generate import generate
    from attndreambooth.inference.loading import load_pipe
    out, _ = staged
    pipe, concept, _ = load_pipe(out, stage="stage2")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and concept == "<v> toy"
    generate(pipe, concept, ["a {} on the beach"], tmp_path, num_images=1, steps=2, attention_maps=True, height=64,
             width=64)
    saved = np.load(next(tmp_path.iterdir()) / "attention_maps.npz")
    assert saved["maps"].shape == (1, 512, 8, 8) and list(saved["tokens"]) == ["a", "<v>", "toy", "on", "the", "beach"]
    np.testing.assert_allclose(saved["maps"].sum(1), 1.0, rtol=1e-5)
    assert list(saved["positions"]) == [0, 1, 2, 3, 4, 5]  # T5 has no start token


@pytest.mark.parametrize("blocks, recorded", [("double", 2), ("all", 4)])
def test_the_captured_layers_are_the_ones_the_config_names(base, blocks, recorded):
    """`reg.joint_blocks` picks the blocks: each named one records one map per call, the others keep their
    stock processor; the transformer's output is the same with the capture on."""
    from attndreambooth.config.schema import RegConfig
    from attndreambooth.families import Flux
    from attndreambooth.families.base import Conditioning
    family, t = Flux(), base.transformer
    reg = RegConfig(joint_blocks=blocks)
    layers = list(family.map_layers(t, reg))
    g = torch.Generator().manual_seed(2)
    cond = Conditioning(torch.randn(1, 512, 32, generator=g), dict(pooled_projections=torch.randn(1, 32, generator=g)))
    x, step = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    stock = dict(t.attn_processors)
    with torch.no_grad():
        want = family.predict(t, x, step, cond)
        with family.capture(t, [1, 2], layers, reg) as capture:
            kept = {n for n, p in t.attn_processors.items() if p is stock[n]}
            got = family.predict(t, x, step, cond)
    assert len(layers) == recorded and list(capture.slots) == layers and kept == set(stock) - set(layers)
    assert [len(s.maps) for s in capture.slots.values()] == [1] * recorded
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, counts", [
    ("black-forest-labs/FLUX.1-dev", ["(4,864 parameters)", "(717,459,456 parameters)", "(11,901,408,320 parameters)"]),
    ("stabilityai/stable-diffusion-3.5-large", ["(6,144 parameters)", "(899,392,512 parameters)",
                                                "(8,056,627,520 parameters)"]),
])
def test_dry_run_plans_the_published_layouts_without_a_download(tmp_path, capsys, monkeypatch, model, counts):
    """Trained parameters per stage from the published configs on the meta device: [V]'s rows (CLIP-L 768 +
    T5 4,096; SD3: + CLIP-G 1,280), stage 2's projections, the whole transformer (FLUX.1-dev's published
    11.9 B), each stage's estimated peak and what each card preset would take. Nothing is fetched."""
    import re

    import diffusers
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", lambda *a, **k: pytest.fail("fetched"))
    T.main(["--config", str(ROOT / "configs/tiny-flux.yaml"), f"model.pretrained={model}", "data.resolution=1024",
            f"output_dir={tmp_path}/run", "--dry_run"])
    out = capsys.readouterr().out
    assert all(c in out for c in counts) and not (tmp_path / "run").exists()
    assert len(re.findall(r"peak ~\d+\.\d GiB", out.split("plan (")[1])) == 3
    assert all(f"{card}: " in out for card in ("24gb", "48gb", "80gb"))


@pytest.mark.parametrize("config, lora", [("flux.yaml", "stage3: train unet, LoRA rank 16 (65,372,160 parameters)"),
                                          ("sd35.yaml", "stage3: train unet, LoRA rank 16 (52,764,672 parameters)")])
def test_the_transformer_configs_plan_without_a_download(tmp_path, capsys, monkeypatch, config, lora):
    import diffusers

    from conftest import SAMPLE
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", lambda *a, **k: pytest.fail("fetched"))
    T.main(["--config", str(ROOT / "configs" / config), f"data.instance_dir={SAMPLE}", "data.category=toy",
            f"output_dir={tmp_path}/run", "--dry_run"])
    out = capsys.readouterr().out
    assert lora in out and "quantize_base: int8" in out and not (tmp_path / "run").exists()


def test_infer_samples_with_the_pipelines_own_defaults_on_flux(staged, tmp_path):
    """Without --scheduler and --guidance_scale, infer.py samples FLUX.1 as FluxPipeline does by default (its
    flow-matching Euler sampler, guidance 3.5 into the guidance input), not with SD's DPM-Solver++ and 7.5; the
    record says what was used."""
    import json

    import infer
    out, _ = staged
    infer.main([str(out), "--prompt", "a {}", "--num_images", "1", "--steps", "1", "--height", "64", "--width", "64",
                "--out", str(tmp_path)])
    record = json.loads(next(tmp_path.glob("*/prompt.json")).read_text())
    assert (record["scheduler"], record["guidance_scale"]) == ("flow_euler", 3.5)


def test_infer_refuses_a_sampler_of_another_family_before_weights_load(staged, tmp_path, monkeypatch):
    import infer
    from attndreambooth.families import source
    monkeypatch.setattr(source, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    out, _ = staged
    with pytest.raises(SystemExit) as e:
        infer.main([str(out), "--prompt", "a {}", "--scheduler", "dpm++", "--out", str(tmp_path)])
    assert str(e.value.code) == ("error: --scheduler dpm++ is not a sampler of this model (family flux); use one "
                                 "of flow_euler")


def test_validation_grids_sample_with_the_models_own_guidance(base, monkeypatch):
    """validation.guidance_scale unset: FLUX.1's own 3.5 into its guidance input, not SD's 7.5; a value given
    is used as given."""
    import contextlib

    from PIL import Image

    from attndreambooth.config.schema import ValidationConfig
    from attndreambooth.families import by_name
    from attndreambooth.inference import sampling
    seen = []

    def sample(pipe, prompt, n, seed, **kwargs):
        seen.append(kwargs["guidance_scale"])
        return [Image.new("RGB", (8, 8))] * n, None
    monkeypatch.setattr(sampling, "sample", sample)
    family = by_name("flux")
    for given, used in ((None, 3.5), (5.0, 5.0)):
        vcfg = ValidationConfig(prompts=["a photo of {}"], num_images=1, guidance_scale=given)
        sampling.validation_grid(family, family.components(base), "<v> toy", vcfg, "cpu", contextlib.nullcontext())
        assert seen.pop() == used
