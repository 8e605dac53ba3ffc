"""SDXL: what differs from SD 1.x/2.x. Two tokenizers and text encoders ([V] gets a row in each, initialised
from the category in that encoder's vocabulary); the conditioning is both encoders' penultimate hidden states
side by side plus the second encoder's pooled, projected embedding; the U-Net also takes size and crop
conditioning (`time_ids`: original size, crop top-left, target size), computed as diffusers' SDXL training
scripts do, the crop coming from the augmentation; its embedding files hold {clip_l, clip_g}."""
import tempfile
from pathlib import Path

import torch

from attndreambooth.families.base import Conditioning, Family
from attndreambooth.families.sd import SD21_VAE, TINY_VAE
from attndreambooth.families.tokenizer import write_tiny_tokenizer

# SDXL-base 1.0, from its published configs (for plans and memory estimates; 70 attn2 layers, most at 32x32).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_TEXT = (  # CLIP ViT-L/14's text encoder and OpenCLIP ViT-bigG/14's (with its projection)
    dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))

# The tiny SDXL layout: the real block structure (no attention at the first level, transformer_layers_per_block
# > 1, text_time conditioning, two text encoders side by side), tiny widths.
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 2, 4),
    transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_SDXL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, projection_dim=32)
EMBEDDING_KEYS = ("clip_l", "clip_g")  # the embedding format AUTOMATIC1111 and ComfyUI read for SDXL


class SDXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    tiny_layouts = ("tiny-sdxl",)
    needs_view_geometry = True
    embedding_keys = EMBEDDING_KEYS
    embedding_kind, model_kind = "an SDXL embedding (clip_l, clip_g)", "an SDXL model"

    def matches_index(self, model_index):
        return "XL" in model_index.get("_class_name", "")

    def matches_checkpoint_keys(self, keys):
        return any(k.startswith("conditioner.embedders.1.") for k in keys)  # the second text encoder

    def matches_name(self, name):
        return "xl" in Path(name).name.lower()

    def pipeline(self, components):
        return self.pipeline_cls()(**components, add_watermarker=False)

    def load_kwargs(self):
        return {}

    def encode(self, text_encoders, input_ids):
        """(hidden (B, 77, D1 + D2), pooled (B, D2)) as StableDiffusionXLPipeline encodes a prompt: penultimate
        hidden states of both encoders, the second's projected pooled output."""
        first = text_encoders[0](input_ids[0], output_hidden_states=True)
        second = text_encoders[1](input_ids[1], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(hidden, dict(text_embeds=second.text_embeds))

    def predict(self, denoiser, noisy, timesteps, cond, view_geometry=None):
        extra = dict(text_embeds=cond.extra["text_embeds"], time_ids=view_geometry)
        return denoiser(noisy, timesteps, encoder_hidden_states=cond.hidden, added_cond_kwargs=extra).sample

    def placeholder_inputs(self, unet, batch_size, device=None):
        c = unet.config
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        return dict(added_cond_kwargs=dict(text_embeds=torch.zeros(batch_size, pooled, device=device),
                                           time_ids=torch.zeros(batch_size, 6, device=device)))

    def embedding_files(self, rows, placeholder):
        both = {k: row.detach()[None] for k, row in zip(EMBEDDING_KEYS, rows)}
        return {"learned_embeds.safetensors": both, "embedding_a1111.safetensors": both}

    def meta_layout(self, name):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
        with torch.device("meta"):
            texts = [CLIPTextModel(CLIPTextConfig(**c)) for c in SDXL_TEXT]
            return "the built-in SDXL-base layout", UNet2DConditionModel(**SDXL_UNET), texts, AutoencoderKL(**SD21_VAE)

    def meta_layout_of_checkpoint(self, keys):
        return self.meta_layout("sdxl")

    def build_tiny(self, folder, layout="tiny-sdxl", seed=0):
        """A tiny SDXL-shaped pipeline with random weights from `seed`, saved as a diffusers folder."""
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = []
        for pad in ("<|endoftext|>", "!"):  # as SDXL's: the first pads with the end token, the second with "!"
            with tempfile.TemporaryDirectory() as tmp:
                vocab_size = write_tiny_tokenizer(tmp, pad_token=pad)
                tokenizers.append(CLIPTokenizer.from_pretrained(tmp))
        torch.manual_seed(seed)
        config = lambda tok, act: CLIPTextConfig(vocab_size=vocab_size, pad_token_id=tok.pad_token_id,  # noqa: E731
                                                 bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                                 hidden_act=act, **TINY_SDXL_TEXT)
        text_encoder = CLIPTextModel(config(tokenizers[0], "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(config(tokenizers[1], "gelu"))
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
        pipe = StableDiffusionXLPipeline(vae=AutoencoderKL(**TINY_VAE), text_encoder=text_encoder,
                                         text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
                                         tokenizer_2=tokenizers[1], unet=UNet2DConditionModel(**TINY_SDXL_UNET),
                                         scheduler=scheduler, add_watermarker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
