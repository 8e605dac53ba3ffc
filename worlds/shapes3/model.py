"""The third world's text-to-image model: a stock Stable Diffusion 2.x layout at CPU widths.

- Tokenizer: a CLIP BPE tokenizer made in code, every word of the world one token.
- Text encoder: CLIP architecture, 2 layers of width 128 (causal mask, as CLIP), pretrained alone on captions and
  then frozen (worlds.shapes3.text).
- VAE: AutoencoderKL downsampling 4x to 8 channels (the second world's 16 channels gave the U-Net 4x the numbers
  to model per position), its latents normalised per channel by `fold_latent_norm`, so scaling_factor is 1.
- U-Net: UNet2DConditionModel with SD 2.x's blocks and its 16 attn2 layers (linear projections), widths
  32/64/128/128, cross-attention dimension 128, on 16x16 latents.
"""
import tempfile

import torch

from attndreambooth.families.sd import SD21_UNET
from attndreambooth.families.tokenizer import TINY_WORDS, write_tiny_tokenizer
from worlds.shapes3.scene import WORDS

LATENT_CHANNELS = 8
UNET = dict(SD21_UNET, sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            block_out_channels=(32, 64, 128, 128), attention_head_dim=(2, 4, 8, 8), cross_attention_dim=128,
            norm_num_groups=4)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=128)
# GroupNorm with 4 groups: with one or two channels a group it removes each channel's mean per image, and a
# flat-colour world keeps its colours there (the first world's VAE measured it)
VAE = dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1, sample_size=64,
           block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, scaling_factor=1.0)
VOCABULARY = tuple(dict.fromkeys(WORDS + tuple(TINY_WORDS)))  # the world's words and the tiny model's


def build(seed=0):
    """(tokenizer, text encoder, VAE, U-Net, noise scheduler) with fresh weights from `seed`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(tmp, VOCABULARY, whole_words=True)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=vocab_size - 2,
                                                eos_token_id=vocab_size - 1, **TEXT))
    vae, unet = AutoencoderKL(**VAE), UNet2DConditionModel(**UNET)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, prediction_type="epsilon")
    return tokenizer, text_encoder, vae, unet, scheduler


@torch.no_grad()
def fold_latent_norm(vae, mean, std):
    """Fold a per-channel normalisation of the latents, z' = (z - mean) / std, into the VAE's own 1x1
    convolutions: quant_conv then gives z' (and its log-variance shifted by -2 log std), post_quant_conv takes
    z' back to what the decoder was trained on. Decoding is unchanged, and the stock pipelines' single
    scaling_factor (1 here) stays right for every channel."""
    c = mean.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= std.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * std.log()
    pq.bias += pq.weight[:, :, 0, 0] @ mean
    pq.weight *= std.view(1, c, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
