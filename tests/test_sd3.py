"""SD3 / SD3.5 through the same seam as FLUX.1: the tiny SD3.5-Medium-shaped model (joint blocks, one with
image-only attention, CLIP-L, CLIP-G and T5) trains the three stages; each stage trains what it claims; the
flow-matching term and Eq. 2 on the joint maps equal independent computations; the outputs load in stock
StableDiffusion3Pipeline."""
import pytest
import torch
from safetensors.torch import load_file

import train_attndreambooth as T
from conftest import ROOT, tiny_overrides
from test_flux import changed, run_with_stage_snapshots
from test_joint_maps import ExplicitSD3

PROMPT = "a photo of a <v> toy"


def sd3_run(out, **overrides):
    return T.main(["--config", str(ROOT / "configs/tiny-sd3.yaml"), "runtime.tensorboard=false",
                   *tiny_overrides(out, **overrides)])


@pytest.fixture(scope="module")
def base():
    from diffusers import StableDiffusion3Pipeline

    from attndreambooth.families.source import tiny_model_dir
    return StableDiffusion3Pipeline.from_pretrained(tiny_model_dir("tiny-sd3"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    return run_with_stage_snapshots(sd3_run, tmp_path_factory.mktemp("sd3") / "run")


def ids_of(pipe, prompt):
    return [t(prompt, padding="max_length", max_length=n, return_tensors="pt").input_ids
            for t, n in ((pipe.tokenizer, 77), (pipe.tokenizer_2, 77), (pipe.tokenizer_3, 256))]


def test_each_stage_trains_what_it_claims_and_v_moves_only_in_stage1(staged):
    from attndreambooth.families import SD3
    out, (before, after1, after2, after3) = staged
    assert (out / "finished.json").is_file()
    transformer = {k for k in before if k.startswith("transformer.")}
    assert changed(before, after1) == {"row0", "row1", "row2"}  # [V]'s rows in CLIP-L, CLIP-G and T5
    stage2, claimed = changed(after1, after2), {k for k in transformer if SD3().is_cross_attention(k)}
    assert stage2 <= claimed and {k.split(".")[-2] for k in stage2} >= {"to_q", "add_k_proj", "add_v_proj", "0"}
    assert not any(".attn2." in k for k in claimed)  # SD3.5-Medium's image-only attention is not stage 2's
    stage3 = changed(after2, after3)
    assert stage3 <= transformer and len(stage3) > 0.9 * len(transformer)


def test_the_flow_matching_term_equals_an_independent_computation(base):
    """diffusers' SD3 objective written out: sigma = t / 1000, noisy = (1 - sigma) x + sigma e, the transformer
    with StableDiffusion3Pipeline's own prompt encoding and the timestep in [0, 1000], MSE against e - x."""
    from attndreambooth.families import SD3
    from attndreambooth.trainer.method import AttnDreamBoothLoss
    family, pipe, prompt = SD3(), base, "a photo of a red toy"
    g = torch.Generator().manual_seed(0)
    x, e, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([250.0, 900.0])
    loss = AttnDreamBoothLoss(family, pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                              family.training_scheduler(pipe.scheduler.config), None, "per_layer")
    with torch.no_grad():
        got = loss(x, e, t, input_ids=ids_of(pipe, prompt))["mse"]
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
        s = (t / 1000).view(-1, 1, 1, 1)
        pred = pipe.transformer(hidden_states=(1 - s) * x + s * e, timestep=t,
                                encoder_hidden_states=embeds.expand(2, -1, -1), pooled_projections=pooled.expand(2, -1)).sample
        want = ((pred - (e - x)) ** 2).mean()
    assert embeds.shape[1] == 77 + 256
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("joint_map", ["text", "joint"])
def test_eq2_on_the_joint_maps_equals_an_independent_computation(base, joint_map):
    """Eq. 2 from the explicit softmax over [image, text] keys of every joint block, [V] at CLIP token 5 and
    the category at 6 of the text, against the trainer's capture inside the loss."""
    from attndreambooth.config.schema import RegConfig
    from attndreambooth.families import SD3
    from attndreambooth.trainer.method import AttnDreamBoothLoss
    family, pipe = SD3(), base
    reg = RegConfig(joint_map=joint_map)
    layers = list(family.map_layers(pipe.transformer, reg))
    capture = family.capture(pipe.transformer, [5, 6], layers, reg)
    g = torch.Generator().manual_seed(1)
    x, e, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 700.0])
    ids = ids_of(pipe, "a photo of a red toy")
    loss = AttnDreamBoothLoss(family, pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                              family.training_scheduler(pipe.scheduler.config), capture, "per_layer")
    with torch.no_grad(), capture:
        got = loss(x, e, t, input_ids=ids, mean_weight=2.0, var_weight=5.0)
    explicit = ExplicitSD3()
    processors = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor({n: explicit if n in layers else p for n, p in processors.items()})
    try:
        with torch.no_grad():
            cond = family.encode([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], ids)
            family.predict(pipe.transformer, family.noised(loss.noise_scheduler, x, e, t)[0], t, cond.expand(2))
    finally:
        pipe.transformer.set_attn_processor(processors)
    means, variances = [], []
    for probs in explicit.probs:  # (B, heads, image + text, image + text), keys [image, text]
        image = probs.shape[-1] - 333
        rows = probs[:, :, :image].double()
        if joint_map == "text":
            rows = rows / rows[..., image:].sum(-1, keepdim=True)
        v, c = rows[..., image + 5].flatten(1), rows[..., image + 6].flatten(1)
        means.append(((v.mean(1) - c.mean(1)) ** 2).sum())
        variances.append(((v.var(1) - c.var(1)) ** 2).sum())
    want = 2.0 * torch.stack(means).mean() + 5.0 * torch.stack(variances).mean()
    assert len(explicit.probs) == 2 and want > 0
    torch.testing.assert_close(got["reg"].double(), want, rtol=1e-4, atol=0)


def test_the_run_loads_in_stock_sd3_pipeline_and_the_embedding_with_the_documented_lines(staged):
    from diffusers import StableDiffusion3Pipeline

    from attndreambooth.families.source import tiny_model_dir
    out, _ = staged
    trained = StableDiffusion3Pipeline.from_pretrained(out / "pipeline")
    image = trained(PROMPT, height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir("tiny-sd3"))
    state = load_file(out / "learned_embeds.safetensors")  # the lines docs/inference.md gives
    for key, encoder, tokenizer in (("clip_l", stock.text_encoder, stock.tokenizer),
                                    ("clip_g", stock.text_encoder_2, stock.tokenizer_2),
                                    ("t5", stock.text_encoder_3, stock.tokenizer_3)):
        tokenizer.add_tokens("<v>")
        token_id = tokenizer.convert_tokens_to_ids("<v>")
        if token_id >= encoder.get_input_embeddings().num_embeddings:
            encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[token_id] = state[key][0]
    with torch.no_grad():
        want = trained.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
        got = stock.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    for w, g in ((want[0], got[0]), (want[2], got[2])):
        torch.testing.assert_close(w, g, atol=1e-6, rtol=1e-6)


def comfyui_sd3_lora_modules(blocks):
    """The LoRA module names ComfyUI applies to an SD3 model from a diffusers-format file: "transformer." + each
    diffusers module its MMDiT key table maps onto Stability's weights (comfy/utils.py `mmdit_to_diffusers`:
    the q/k/v slices of each fused qkv, SD3.5-Medium's attn2 included, and `MMDIT_MAP_BLOCK`; read by
    comfy/lora.py `model_lora_keys_unet`, "regular diffusers sd3 lora format"), linear layers only."""
    per_block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "norm1_context.linear", "attn.to_add_out",
                 "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "attn.to_out.0", "attn2.to_out.0",
                 "ff.net.0.proj", "ff.net.2"]
    return {f"transformer.transformer_blocks.{i}.{m}" for i in range(blocks) for m in per_block}


@pytest.mark.slow
def test_the_sd3_lora_file_rebuilds_the_transformer_in_stock_diffusers(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from attndreambooth.families.source import tiny_model_dir
    out = sd3_run(tmp_path / "lora", **{"stages.stage2.lora_rank": 4, "stages.stage3.lora_rank": 4,
                                        "runtime.save_merged_pipeline": "true"})
    merged = StableDiffusion3Pipeline.from_pretrained(out / "pipeline")
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir("tiny-sd3"))
    stock.load_lora_weights(str(out))
    modules = {k.split(".lora_")[0] for k in load_file(out / "pytorch_lora_weights.safetensors")}
    assert modules <= comfyui_sd3_lora_modules(blocks=2)  # every module ComfyUI maps, none it drops
    assert any(".attn2." in m for m in modules) and any(".ff_context." in m for m in modules)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([400.0]),
                  encoder_hidden_states=torch.randn(1, 333, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(merged.transformer(**inputs).sample, stock.transformer(**inputs).sample,
                                   atol=1e-5, rtol=1e-5)


def test_infer_draws_per_token_joint_attention_maps_on_an_sd3_run(staged, tmp_path):
    """infer.py's path (the family's own embedding load, the flow sampler, the maps over the 77 + 256 text
    keys, renormalised over them): each pixel's text weights sum to 1; labels are CLIP-L's tokens."""
    import numpy as np

    from attndreambooth.inference.generate import generate
    from attndreambooth.inference.loading import load_pipe
    out, _ = staged
    pipe, concept, _ = load_pipe(out, stage="stage1")  # the base + the three rows, loaded by the family
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    generate(pipe, concept, ["a {} on the beach"], tmp_path, num_images=1, steps=2, attention_maps=True, height=64,
             width=64)
    saved = np.load(next(tmp_path.iterdir()) / "attention_maps.npz")
    assert saved["maps"].shape == (1, 333, 8, 8) and list(saved["tokens"]) == ["a", "<v>", "toy", "on", "the", "beach"]
    assert list(saved["positions"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(saved["maps"].sum(1), 1.0, rtol=1e-5)
