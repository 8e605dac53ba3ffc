"""SD3 / SD3.5 (Medium, Large): what differs from FLUX.1 (families/flow.py holds what they share). One kind of
block, joint attention over [image patches, text], 24 blocks (Medium) or 38 (Large); SD3.5-Medium's first 13
also have an image-only attention, which is not cross-modal and records nothing.

- Text: CLIP-L's and CLIP-G's penultimate hidden states side by side (77 tokens), padded to T5's width, then
  T5's 256 tokens: [V] is a token of all three, with keys of its own in the CLIP part, where Eq. 2 reads it
  (the CLIP tokenizers place it alike). The pooled vector: both CLIPs' projected outputs.
- Objective: rectified flow, timesteps from the logit-normal density (diffusers' SD3 script's default), the
  schedule's shift (3.0) already in its timesteps; the transformer takes the timestep in [0, 1000].
"""
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from attndreambooth.families.base import Conditioning
from attndreambooth.families.flow import RectifiedFlow
from attndreambooth.families.flux import FLUX_T5, FLUX_VAE, TINY_T5
from attndreambooth.families.sdxl import SDXL_TEXT
from attndreambooth.families.t5_tokenizer import write_tiny_t5_tokenizer
from attndreambooth.families.tokenizer import write_tiny_tokenizer

# SD3.5's published configs (for plans and estimates on the meta device).
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(SD35_LARGE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))
SD3_VAE = dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)
# The tiny SD3.5-Medium layout: joint blocks, one with image-only attention, QK norm; tiny widths.
TINY_TRANSFORMER = dict(SD35_MEDIUM, sample_size=8, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                        pooled_projection_dim=32, pos_embed_max_size=16, dual_attention_layers=(0,))
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, projection_dim=16)
TINY_VAE = dict(SD3_VAE, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                norm_num_groups=8, sample_size=64)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
CLIP_TOKENS, T5_TOKENS = 77, 256  # StableDiffusion3Pipeline's lengths


class SD3(RectifiedFlow):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    tiny_layouts = ("tiny-sd3",)
    density = "logit_normal"
    guidance_scale = 7.0  # StableDiffusion3Pipeline's default
    text_tokens = CLIP_TOKENS + T5_TOKENS
    embedding_keys = ("clip_l", "clip_g", "t5")
    embedding_kind, model_kind = "an SD3 embedding (clip_l, clip_g, t5)", "an SD3 model"
    lora_targets = {
        "cross_attention": r"transformer_blocks\.\d+\.attn\.(to_q|add_k_proj|add_v_proj|to_out\.0)",
        "unet": r"transformer_blocks\.\d+\.(attn|attn2)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)",
    }
    maps_title = "joint attention renormalised over the text (CLIP then T5 tokens)"

    def matches_index(self, model_index):
        return model_index.get("_class_name", "").startswith("StableDiffusion3")

    def matches_checkpoint_keys(self, keys):  # Stability's own layout (MMDiT's joint blocks)
        return any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys)

    def matches_name(self, name):
        return any(w in Path(name).name.lower() for w in ("stable-diffusion-3", "sd3"))

    def token_lengths(self, tokenizers):
        return [CLIP_TOKENS, CLIP_TOKENS, T5_TOKENS]

    def encode(self, text_encoders, input_ids):
        """As StableDiffusion3Pipeline: [CLIP-L | CLIP-G] penultimate states padded to T5's width, then T5's
        states, (B, 77 + 256, 4096); pooled: both CLIPs' projected outputs, (B, 2048)."""
        clip = [encoder(ids, output_hidden_states=True) for encoder, ids in zip(text_encoders[:2], input_ids[:2])]
        t5 = text_encoders[2](input_ids[2])[0]
        both = torch.cat([c.hidden_states[-2] for c in clip], dim=-1)
        hidden = torch.cat([F.pad(both, (0, t5.shape[-1] - both.shape[-1])), t5], dim=-2)
        return Conditioning(hidden, dict(pooled_projections=torch.cat([c[0] for c in clip], dim=-1)))

    def predict(self, denoiser, noisy, timesteps, cond, view_geometry=None):
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond.hidden,
                        pooled_projections=cond.extra["pooled_projections"], return_dict=False)[0]

    def shape_inputs(self, transformer, side):
        c = transformer.config
        return Conditioning(torch.zeros(1, self.text_tokens, c.joint_attention_dim),
                            dict(pooled_projections=torch.zeros(1, c.pooled_projection_dim)))

    def cross_attention_layers(self, transformer):
        """{joint attention processor name: 2}: every block's `attn` (not SD3.5-Medium's image-only `attn2`)."""
        return {n: 2 for n in transformer.attn_processors if self.joint_blocks.fullmatch(n)}

    def map_positions(self, positions):
        if positions[0] != positions[1]:
            raise ValueError(f"the CLIP tokenizers place [V] and the category differently ({positions[:2]}); "
                             "the regulariser needs one position")
        return positions[0]  # in the CLIP part of the text sequence, which comes first

    def capture(self, transformer, columns, layers, reg_cfg, expected_layers=None, text_len=None):
        from attention_reg import CrossAttentionCapture
        from attndreambooth.families.sd3_capture import SD3CaptureProcessor
        text = reg_cfg.joint_map == "text"
        return CrossAttentionCapture(transformer, columns, None, layers,
                                     processor=lambda record, cols: SD3CaptureProcessor(record, cols, renormalise_text=text))

    def load_embedding(self, pipe, path, token):
        """Each row into its tokenizer and encoder by hand: StableDiffusion3Pipeline has no
        load_textual_inversion (docs/inference.md gives users the same lines)."""
        from safetensors.torch import load_file
        state = load_file(path)
        for key, encoder, tokenizer in zip(self.embedding_keys, self.text_encoders(pipe), self.tokenizers(pipe)):
            tokenizer.add_tokens(token)
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id >= encoder.get_input_embeddings().num_embeddings:  # T5's matrix has spare rows already
                encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)
            with torch.no_grad():
                encoder.get_input_embeddings().weight[token_id] = state[key][0]

    def meta_layout(self, name):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
        medium = "medium" in Path(name).name.lower()
        with torch.device("meta"):
            transformer = SD3Transformer2DModel(**(SD35_MEDIUM if medium else SD35_LARGE))
            texts = [CLIPTextModelWithProjection(CLIPTextConfig(**c)) for c in SDXL_TEXT]
            texts.append(T5EncoderModel(T5Config(**FLUX_T5)))
            vae = AutoencoderKL(**SD3_VAE)
        return f"the built-in SD3.5-{'Medium' if medium else 'Large'} layout", transformer, texts, vae

    def meta_layout_of_checkpoint(self, keys):
        medium = any(".attn2." in k for k in keys)  # SD3.5-Medium's image-only attention
        return self.meta_layout("sd3.5-medium" if medium else "sd3.5-large")

    def build_tiny(self, folder, layout="tiny-sd3", seed=0):
        """A tiny SD3.5-Medium-shaped pipeline with random weights from `seed`, saved as a diffusers folder."""
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                               StableDiffusion3Pipeline)
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
        from transformers import T5Tokenizer

        tokenizers = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, pad in enumerate(("<|endoftext|>", "!")):  # as SD3's: CLIP-L pads with the end token, CLIP-G "!"
                vocab_size = write_tiny_tokenizer(Path(tmp) / f"clip{i}", pad_token=pad)
                tokenizers.append(CLIPTokenizer.from_pretrained(Path(tmp) / f"clip{i}"))
            t5_vocab = write_tiny_t5_tokenizer(Path(tmp) / "t5", model_max_length=512)
            tokenizers.append(T5Tokenizer.from_pretrained(Path(tmp) / "t5"))
        torch.manual_seed(seed)
        clips = [CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1, hidden_act=act, **TINY_CLIP))
            for tok, act in zip(tokenizers, ("quick_gelu", "gelu"))]
        t5 = T5EncoderModel(T5Config(**dict(TINY_T5, vocab_size=t5_vocab), pad_token_id=0, eos_token_id=1))
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKL(**TINY_VAE),
            text_encoder=clips[0], tokenizer=tokenizers[0], text_encoder_2=clips[1], tokenizer_2=tokenizers[1],
            text_encoder_3=t5, tokenizer_3=tokenizers[2], transformer=SD3Transformer2DModel(**TINY_TRANSFORMER))
        pipe.save_pretrained(folder, safe_serialization=True)
