"""FLUX.1 (dev, schnell): what differs from SD. A transformer denoiser (19 double-stream blocks, then 38
single-stream blocks) over the joint sequence [T5 tokens, image patches]; rectified flow instead of DDPM.

- Text: T5 gives the per-token states (the only text that enters attention, so [V] has a map only as a T5
  token); CLIP-L gives only the pooled vector (global modulation). [V] gets a row in both.
- Training objective (diffusers' Flux scripts): sigma from the timestep density (uniform by default, as
  their `--weighting_scheme none`), noisy = (1 - sigma) x + sigma e, target e - x, unweighted MSE; the
  latents are the VAE's, shifted and scaled, packed 2x2 into tokens. FLUX.1-dev is guidance-distilled: it is
  trained with a guidance input (`model.guidance`, default 1.0 as diffusers' and kohya's trainers use).
- Maps (families/flux_capture.py): [V]'s column of the image queries' joint softmax, by default renormalised
  over the text keys (`reg.joint_map`), in the double-stream blocks (`reg.joint_blocks`); docs/models.md says
  why.
- Stage 2 (the analogue of SD's attn2): in the double-stream blocks the image queries `to_q`, the text keys
  and values `add_k_proj` / `add_v_proj`, and the image output `to_out.0`.
"""
import copy
import re
import tempfile
from pathlib import Path

import torch

from attndreambooth.families.base import Conditioning
from attndreambooth.families.flow import RectifiedFlow
from attndreambooth.families.sd import SD15_TEXT
from attndreambooth.families.t5_tokenizer import write_tiny_t5_tokenizer
from attndreambooth.families.tokenizer import write_tiny_tokenizer

# FLUX.1-dev's published configs (for plans and estimates on the meta device; -schnell has no guidance input).
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
               dropout_rate=0.0, is_encoder_decoder=False)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
# The tiny FLUX.1 layout: the real structure (double and single blocks, guidance input, T5 and CLIP encoders,
# a 16-channel-like packed latent from a 4-channel VAE), tiny widths.
TINY_TRANSFORMER = dict(FLUX_TRANSFORMER, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=(2, 2, 4))
TINY_T5 = dict(FLUX_T5, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=32)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
TINY_VAE = dict(FLUX_VAE, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                norm_num_groups=8, sample_size=64)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
T5_TOKENS = 512  # the text length FluxPipeline encodes by default: training uses the same keys
DOUBLE = re.compile(r"transformer_blocks\.\d+\.attn\.processor")
SINGLE = re.compile(r"single_transformer_blocks\.\d+\.attn\.processor")
LORA_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "proj_mlp", "proj_out")


class Flux(RectifiedFlow):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    tiny_layouts = ("tiny-flux",)
    density = "none"  # diffusers' Flux scripts' default timestep density (uniform)
    guidance = 1.0  # the guidance input while training
    guidance_scale = 3.5  # FluxPipeline's default for sampling (FLUX.1-dev's guidance input)
    text_tokens = T5_TOKENS
    embedding_keys = ("clip_l", "t5")  # the names diffusers' advanced FLUX.1 script saves its embeddings under
    embedding_kind, model_kind = "a FLUX.1 embedding (clip_l, t5)", "a FLUX.1 model"
    lora_targets = {
        "cross_attention": r"transformer_blocks\.\d+\.attn\.(to_q|add_k_proj|add_v_proj|to_out\.0)",
        "unet": r"(single_)?transformer_blocks\.\d+\.(" + "|".join(re.escape(n) for n in LORA_LINEARS) + ")",
    }
    map_tokenizer = 1  # T5
    maps_title = "joint attention renormalised over the text, double-stream blocks"

    def matches_index(self, model_index):
        return model_index.get("_class_name", "").startswith("Flux")

    def matches_checkpoint_keys(self, keys):  # Black Forest Labs' own layout, bare or in a ComfyUI checkpoint
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    def matches_name(self, name):
        return "flux" in Path(name).name.lower()

    def configured(self, model_cfg):
        family = copy.copy(self)
        family.guidance = self.guidance if model_cfg.guidance is None else model_cfg.guidance
        return family

    def token_lengths(self, tokenizers):
        return [77, T5_TOKENS]  # FluxPipeline's CLIP and T5 lengths

    # -- conditioning and the objective -----------------------------------------------------------------
    def encode(self, text_encoders, input_ids):
        """(T5's last hidden states (B, 512, 4096), CLIP-L's pooled output (B, 768)) as FluxPipeline encodes."""
        pooled = text_encoders[0](input_ids[0], output_hidden_states=False).pooler_output
        return Conditioning(text_encoders[1](input_ids[1], output_hidden_states=False)[0],
                            dict(pooled_projections=pooled))

    def predict(self, denoiser, noisy, timesteps, cond, view_geometry=None):
        """The transformer on the 2x2-packed latent, unpacked back to (B, C, H, W)."""
        from diffusers import FluxPipeline
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(cond.hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((b,), float(self.guidance), device=noisy.device)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=cond.extra["pooled_projections"], encoder_hidden_states=cond.hidden,
                       txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def shape_inputs(self, transformer, side):
        c = transformer.config
        return Conditioning(torch.zeros(1, T5_TOKENS, c.joint_attention_dim), dict(
            pooled_projections=torch.zeros(1, c.pooled_projection_dim)))

    # -- the maps ------------------------------------------------------------------------------------
    def cross_attention_layers(self, transformer):
        """{attention processor name: 2} for every joint-attention block (double-stream, then single-stream):
        each map is over the 2x2 patches, half the latent's side."""
        names = [n for n in transformer.attn_processors if DOUBLE.fullmatch(n)]
        names += [n for n in transformer.attn_processors if SINGLE.fullmatch(n)]
        return {n: 2 for n in names}

    def map_positions(self, positions):
        return positions[1]  # T5's: the only tokens with keys in the joint attention

    def capture(self, transformer, columns, layers, reg_cfg, expected_layers=None, text_len=T5_TOKENS):
        from attention_reg import CrossAttentionCapture
        from attndreambooth.families.flux_capture import FluxCaptureProcessor
        make = lambda record, cols: FluxCaptureProcessor(record, cols, text_len,  # noqa: E731
                                                         renormalise_text=reg_cfg.joint_map == "text")
        return CrossAttentionCapture(transformer, columns, None, layers, processor=make)

    # -- layouts and the tiny model ------------------------------------------------------------------------
    def meta_layout(self, name):
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
        schnell = "schnell" in Path(name).name.lower()
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**dict(FLUX_TRANSFORMER, guidance_embeds=not schnell))
            texts = [CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), T5EncoderModel(T5Config(**FLUX_T5))]
            vae = AutoencoderKL(**FLUX_VAE)
        return f"the built-in FLUX.1-{'schnell' if schnell else 'dev'} layout", transformer, texts, vae

    def meta_layout_of_checkpoint(self, keys):
        return self.meta_layout("flux-schnell" if not any("guidance_in" in k for k in keys) else "flux-dev")

    def build_tiny(self, folder, layout="tiny-flux", seed=0):
        """A tiny FLUX.1-shaped pipeline with random weights from `seed`, saved as a diffusers folder."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            vocab_size = write_tiny_tokenizer(Path(tmp) / "clip", pad_token="<|endoftext|>")
            tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "clip")
            t5_vocab = write_tiny_t5_tokenizer(Path(tmp) / "t5", model_max_length=T5_TOKENS)
            tokenizer_2 = T5Tokenizer.from_pretrained(Path(tmp) / "t5")
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, **TINY_CLIP))
        t5 = T5EncoderModel(T5Config(**dict(TINY_T5, vocab_size=t5_vocab), pad_token_id=0, eos_token_id=1))
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKL(**TINY_VAE),
                            text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                            transformer=FluxTransformer2DModel(**TINY_TRANSFORMER))
        pipe.save_pretrained(folder, safe_serialization=True)
