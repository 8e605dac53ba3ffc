"""SDXL: what differs from SD 1.x/2.x, in one place. Two tokenizers and text encoders ([V] gets a row in
each, initialised from the category in that encoder's vocabulary); the conditioning is both encoders'
penultimate hidden states side by side plus the second encoder's pooled, projected embedding; the U-Net
also takes size and crop conditioning (`time_ids`: original size, crop top-left, target size), computed
as diffusers' SDXL training scripts do, the crop coming from the augmentation."""
import tempfile
from pathlib import Path

import torch

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


def is_sdxl_model(kind, where, model_cfg):
    """True for an SDXL base: its model_index.json names an XL pipeline (a folder, or the hub, which sends only
    that file), or a single-file checkpoint holds the second text encoder (conditioner.embedders.1)."""
    if kind == "single_file":
        if model_cfg.single_file_config:
            return is_sdxl_model("folder" if Path(model_cfg.single_file_config).is_dir() else "hub",
                                 model_cfg.single_file_config, model_cfg)
        if where.endswith(".safetensors"):
            from attndreambooth.layouts import model_family
            return model_family(kind, where) == "sdxl"
        return False
    from diffusers import DiffusionPipeline
    index = DiffusionPipeline.load_config(where, revision=model_cfg.revision if kind == "hub" else None)
    return "XL" in index.get("_class_name", "")


def is_sdxl(pipe):
    return getattr(pipe, "text_encoder_2", None) is not None


def extra_unet_inputs(unet, batch_size, device=None):
    """Placeholder SDXL inputs of the U-Net (zero pooled embedding and size/crop ids) for shape-only work (FLOP
    and activation counts); {} for a U-Net without text_time conditioning."""
    c = unet.config
    if c.addition_embed_type != "text_time":
        return {}
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(added_cond_kwargs=dict(text_embeds=torch.zeros(batch_size, pooled, device=device),
                                       time_ids=torch.zeros(batch_size, 6, device=device)))


def time_ids(original_size, crop_top_left, target_size):
    """SDXL's micro-conditioning for one image: (orig h, orig w, crop top, crop left, target h, target w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def encode(text_encoder, text_encoder_2, input_ids, input_ids_2):
    """(hidden (B, 77, D1 + D2), pooled (B, D2)) for token ids of both tokenizers, as StableDiffusionXLPipeline
    encodes a prompt: penultimate hidden states of both encoders, the second's projected pooled output."""
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def embedding_file(row_l, row_g):
    """The two [V] rows in the SDXL embedding format that AUTOMATIC1111 and ComfyUI read."""
    return {"clip_l": row_l.detach()[None], "clip_g": row_g.detach()[None]}


def load_embedding(pipe, path, token):
    """Load an SDXL embedding file into both tokenizers and encoders with diffusers' load_textual_inversion."""
    from safetensors.torch import load_file
    state = load_file(path)
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def build_tiny_sdxl_pipeline(folder, seed=0):
    """A tiny SDXL-shaped pipeline with random weights from `seed`, saved as a diffusers folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from attndreambooth.models import TINY_VAE, write_tiny_tokenizer
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
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
                                     unet=UNet2DConditionModel(**TINY_SDXL_UNET), scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
