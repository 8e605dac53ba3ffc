"""SDXL: the built-in tiny SDXL-shaped model (two text encoders, text_time conditioning, more than one
transformer layer per block) trains all three stages, full and LoRA; [V] trains a row in each encoder; the
outputs load in stock StableDiffusionXLPipeline; the conditioning and size/crop inputs are diffusers'."""
import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train_attndreambooth as T
from conftest import ROOT, SAMPLE, tiny_overrides

PROMPT = "a photo of a <v> toy"


def sdxl_run(out, **overrides):
    return T.main(["--config", str(ROOT / "configs/tiny.yaml"), "model.pretrained=tiny-sdxl",
                   "runtime.tensorboard=false", *tiny_overrides(out, **overrides)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return sdxl_run(tmp_path_factory.mktemp("sdxl") / "run")


@pytest.fixture(scope="module")
def base():
    from diffusers import StableDiffusionXLPipeline

    from attndreambooth.families.source import tiny_model_dir
    return tiny_model_dir("tiny-sdxl"), StableDiffusionXLPipeline


def stock_conditioning(pipe):
    """diffusers' own SDXL prompt encoding: (prompt embeds, pooled embeds)."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    return embeds, pooled


def test_tiny_sdxl_has_the_sdxl_structure(base):
    from attndreambooth.families import SDXL
    folder, cls = base
    pipe = cls.from_pretrained(folder)
    cross_attention_layers = SDXL().cross_attention_layers
    assert pipe.unet.config.addition_embed_type == "text_time" and max(pipe.unet.config.transformer_layers_per_block) > 1
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert len(cross_attention_layers(pipe.unet)) == 17  # the capture finds them all, not 16


@pytest.mark.slow
def test_sdxl_trains_three_stages_and_loads_in_stock_diffusers(run, base):
    from attndreambooth.families import SDXL
    load_embedding = SDXL().load_embedding
    folder, cls = base
    assert (run / "finished.json").exists()
    trained, stock = cls.from_pretrained(run / "pipeline"), cls.from_pretrained(folder)
    rows = load_file(run / "learned_embeds.safetensors")
    assert set(rows) == {"clip_l", "clip_g"} and load_file(run / "embedding_a1111.safetensors").keys() == rows.keys()
    for tokenizer, encoder, key in ((stock.tokenizer, stock.text_encoder, "clip_l"),
                                    (stock.tokenizer_2, stock.text_encoder_2, "clip_g")):
        category = encoder.get_input_embeddings().weight[tokenizer("toy", add_special_tokens=False).input_ids[0]]
        assert rows[key].shape == (1, category.shape[0]) and not torch.allclose(rows[key][0], category)  # trained
    load_embedding(stock, run / "learned_embeds.safetensors", "<v>")  # stock load_textual_inversion, twice
    want, got = stock_conditioning(trained), stock_conditioning(stock)
    for w, g in zip(want, got):
        torch.testing.assert_close(w, g, atol=1e-5, rtol=1e-5)
    ids = [t(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
           for t in (trained.tokenizer, trained.tokenizer_2)]
    with torch.no_grad():  # the trainer's conditioning is diffusers' SDXL conditioning
        cond = SDXL().encode([trained.text_encoder, trained.text_encoder_2], ids)
        mine = cond.hidden, cond.extra["text_embeds"]
    for w, m in zip(want, mine):
        torch.testing.assert_close(w, m, atol=1e-6, rtol=1e-6)
    changed = [k for k, p in trained.unet.state_dict().items() if not torch.equal(p, stock.unet.state_dict()[k])]
    assert any("attn2.to_k" in k for k in changed) and any("conv_in" in k for k in changed)  # stages 2 and 3 ran


def test_views_carry_the_size_and_crop_conditioning(tiny_pipe):
    from attndreambooth.config.schema import AugmentConfig, DataConfig
    from attndreambooth.trainer.data import augmented_view, encode_view_pool
    image = Image.fromarray(torch.randint(0, 255, (60, 40, 3), dtype=torch.uint8).numpy())  # h 60, w 40
    view, (top, left) = augmented_view(image, 32, AugmentConfig(rotate_prob=0, flip_prob=0), random.Random(3))
    expected = image.resize((32, 48), Image.BICUBIC).crop((left, top, left + 32, top + 32))
    assert left == 0 and 0 <= top <= 16 and view.tobytes() == expected.tobytes()
    paths = sorted(SAMPLE.glob("*.jpg"))[:2]
    cfg = DataConfig(instance_dir=str(SAMPLE), category="toy", resolution=64, views_per_image=3)
    _, _, time_ids = encode_view_pool(tiny_pipe.vae, paths, cfg, 0, "cpu")
    for i, path in enumerate(paths):
        w, h = Image.open(path).size
        for v in range(3):
            oh, ow, ct, cl, th, tw = time_ids[i * 3 + v].tolist()
            assert (oh, ow, th, tw) == (h, w, 64, 64) and ct >= 0 and cl >= 0


@pytest.mark.slow
def test_sdxl_lora_file_rebuilds_the_unet_in_stock_diffusers(tmp_path, base):
    from attndreambooth.families import SDXL
    load_embedding = SDXL().load_embedding
    folder, cls = base
    out = sdxl_run(tmp_path / "lora", **{"stages.stage2.lora_rank": 4, "stages.stage3.lora_rank": 4,
                                         "runtime.save_merged_pipeline": "true"})
    merged, stock = cls.from_pretrained(out / "pipeline"), cls.from_pretrained(folder)
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")  # ComfyUI reads SDXL's by these names too
    linear = {n.replace(".", "_") for n, m in stock.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kohya and all(k.split(".")[0].removeprefix("lora_unet_") in linear for k in kohya)
    load_embedding(stock, out / "learned_embeds.safetensors", "<v>")
    stock.load_lora_weights(str(out))
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 64]] * 2)
    outputs = []
    for pipe in (merged, stock):
        embeds, pooled = stock_conditioning(pipe)
        with torch.no_grad():
            outputs.append(pipe.unet(latents, t, embeds.expand(2, -1, -1), added_cond_kwargs=dict(
                text_embeds=pooled.expand(2, -1), time_ids=time_ids)).sample)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_infer_on_an_sdxl_run_with_attention_maps_and_its_stages(run, tmp_path):
    import numpy as np

    from attndreambooth.inference.generate import generate
    from attndreambooth.inference.loading import load_pipe
    pipe, concept, _ = load_pipe(run)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and concept == "<v> toy"
    generate(pipe, concept, ["a {} on the beach"], tmp_path, num_images=1, steps=2, attention_maps=True)
    folder = next(tmp_path.iterdir())
    maps = np.load(folder / "attention_maps.npz")
    arrays = [maps[k] for k in maps.files]
    assert (folder / "000.png").is_file() and (folder / "attention.png").is_file() and arrays
    after_stage2, _, _ = load_pipe(run, stage="stage2")  # the base + both rows + stage 2's attn2 weights
    assert "<v>" in after_stage2.tokenizer_2.get_added_vocab()
    attn2 = load_file(run / "attn2_stage2.safetensors")
    name = next(iter(attn2))
    torch.testing.assert_close(after_stage2.unet.state_dict()[name], attn2[name])


def test_an_embedding_for_the_other_kind_of_base_is_refused_before_loading(run, tmp_path, monkeypatch):
    import attndreambooth.families.source as M
    import infer
    monkeypatch.setattr(M, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    sd_file = tmp_path / "sd.safetensors"  # the SD format: one row under the token
    save_file({"<v>": torch.zeros(1, 32)}, sd_file)
    for base, embeds, message in (
            ("tiny", run / "learned_embeds.safetensors", "is an SDXL embedding (clip_l, clip_g) but --base tiny is "
                                                         "not an SDXL model"),
            ("tiny-sdxl", sd_file, "is an SD embedding (one text encoder) but --base tiny-sdxl is an SDXL model")):
        with pytest.raises(SystemExit) as e:
            infer.main(["--base", base, "--embeds", str(embeds), "--category", "toy", "--prompt", "a {}",
                        "--out", str(tmp_path / "o")])
        assert str(e.value.code) == f"error: --embeds {embeds} {message}; give the base the embedding was trained on"


def test_an_sdxl_base_is_recognised_in_every_form(base, tiny_dir, tmp_path):
    """A folder by its model_index.json, a single .safetensors file by its second text encoder's keys (as
    SDXL checkpoints are laid out), a .ckpt through model.single_file_config."""
    from attndreambooth.config.schema import ModelConfig
    from attndreambooth.families.source import family_of

    def xl(pretrained, **kw):
        return family_of(ModelConfig(pretrained=str(pretrained), **kw)).name == "sdxl"
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1),
               "conditioner.embedders.1.model.y": torch.zeros(1)}, tmp_path / "xl.safetensors")
    save_file({"cond_stage_model.transformer.x": torch.zeros(1)}, tmp_path / "sd.safetensors")
    (tmp_path / "xl.ckpt").write_bytes(b"")
    assert [xl(base[0]), xl(tiny_dir), xl("tiny-sdxl"), xl("tiny")] == [True, False, True, False]
    assert [xl(tmp_path / "xl.safetensors"), xl(tmp_path / "sd.safetensors")] == [True, False]
    assert [xl(tmp_path / "xl.ckpt"), xl(tmp_path / "xl.ckpt", single_file_config=str(base[0]))] == [False, True]


@pytest.mark.slow
def test_killed_sdxl_run_resumes_to_the_same_weights(tmp_path):
    """Killed in stage 1 (both encoders' [V] rows and their AdamW states in the checkpoint), the resumed SDXL
    run ends bit for bit where the uninterrupted one does (later stages resume as on SD: test_resume.py)."""
    from test_resume import straight_and_killed
    want, got = straight_and_killed(tmp_path, ["stage1:3"], **{"model.pretrained": "tiny-sdxl"})
    assert {"clip_l", "clip_g"} <= {k.split("/")[-1] for k in want}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
