"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet2DConditionModel with 16 cross-attention layers.
The versions differ only in data (the layouts below: attn2 projections, head counts, the text encoder, the
padding token), so one family serves them all."""
import re
import tempfile
from pathlib import Path

import torch

from attndreambooth.families.base import Family
from attndreambooth.families.tokenizer import write_tiny_tokenizer

# SD 2.1-base, from its published configs: used to count parameters and to build the layout on the meta device
# (no weights, no download).
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
# SD 1.x (1.5, 1.4): attn2 with conv projections, 8 heads everywhere, 768-d cross-attention; CLIP ViT-L/14 text
SD15_UNET = dict(SD21_UNET, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)
SD15_TEXT = dict(SD21_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
# The tiny model: SD 2.x layout (4 levels, 16 attn2 layers, linear projections), tiny widths.
TINY_UNET = dict(SD21_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
                 cross_attention_dim=32, norm_num_groups=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
TINY_VAE = dict(SD21_VAE, sample_size=64, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
# The tiny SD 1.5 layout: what SD 1.5 differs in from SD 2.x (attn2 with conv projections and one head count
# everywhere, a quick-GELU CLIP text encoder, padding with <|endoftext|>); the same 16 cross-attention layers.
TINY15_UNET = dict(TINY_UNET, attention_head_dim=4, use_linear_projection=False)
TINY15_TEXT = dict(TINY_TEXT, hidden_act="quick_gelu")
TINY_LAYOUTS = {"tiny": (TINY_UNET, TINY_TEXT, "!"), "tiny-sd15": (TINY15_UNET, TINY15_TEXT, "<|endoftext|>")}


def is_sd15_name(name):
    """True for a hub id or file name that says SD 1.x ("v1-5", "sd15", "1.5")."""
    return bool(re.search(r"v1[-_.]?[1-5]\b|sd-?1[-_.]?[45]\b|1\.5", Path(name).name.lower()))


def sd_layout(device="meta", unet=SD21_UNET, text=SD21_TEXT):
    """An SD U-Net and text encoder built from config (meta device: shapes only, no memory): SD 2.1-base's by
    default, SD 1.5's with SD15_UNET and SD15_TEXT."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return UNet2DConditionModel(**unet), CLIPTextModel(CLIPTextConfig(**text))


class SD(Family):
    name = "sd"
    tiny_layouts = tuple(TINY_LAYOUTS)

    def matches_checkpoint_keys(self, keys):
        return True  # the fallback: any single file that no other family claims

    def matches_name(self, name):
        return True

    def meta_layout(self, name):
        from diffusers import AutoencoderKL
        with torch.device("meta"):
            vae = AutoencoderKL(**SD21_VAE)
        if is_sd15_name(name):
            unet, text = sd_layout(unet=SD15_UNET, text=SD15_TEXT)
            return "the built-in SD 1.5 layout", unet, [text], vae
        unet, text = sd_layout()
        return "the built-in SD 2.1-base layout", unet, [text], vae

    def meta_layout_of_checkpoint(self, keys):
        """The layout of an original-format SD file: SD 1.x's CLIP `transformer` keys, else SD 2.x's OpenCLIP."""
        sd15 = any(k.startswith("cond_stage_model.transformer.") for k in keys)
        return self.meta_layout("sd15" if sd15 else "sd21")

    def build_tiny(self, folder, layout="tiny", seed=0):
        """A tiny pipeline with random weights from `seed`, saved as a diffusers folder: the SD 2.x layout
        ("tiny") or SD 1.5's ("tiny-sd15")."""
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        unet_cfg, text_cfg, pad = TINY_LAYOUTS[layout]
        with tempfile.TemporaryDirectory() as tmp:
            vocab_size = write_tiny_tokenizer(tmp, pad_token=pad)
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                                                    bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                                    **text_cfg))
        vae = AutoencoderKL(**TINY_VAE)
        unet = UNet2DConditionModel(**unet_cfg)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
