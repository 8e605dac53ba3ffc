"""The shapes world's text-to-image model: the SD 2.x layout (a KL VAE, a CLIP text encoder, a U-Net with
the 16 cross-attention layers and linear projections) at widths a CPU can pretrain. Latents are 16x16 with
16 channels, as SD3's and Flux's VAEs have for detail (the VAE downsamples 4x, not SD's 8x, so a pattern of a
few pixels survives encoding). Measured on the VAE's round trip of 300 scenes: the first world's 4 channels
kept 74 % of shapes; 8 channels, widths 16/32/64, 6,000 steps: shape 81 %, pattern 86 %, a checkerboard
concept's identity 0.28; widths 32/64/64: 85 %, 88 %, 0.39 (a 4x4 patch of a two-colour pattern has more
to say than 8 numbers hold). GroupNorm has 4 groups, not 16: with one or two channels a group it removes
each channel's mean per image, and a flat-colour world keeps its colours there (measured on the first
world's VAE: round-trip text alignment 0.65-0.74 with 16 groups in three short trials, 0.88 with 4)."""
import tempfile

from worlds.shapes.scene import WORDS
from attndreambooth.families.sd import SD21_UNET
from attndreambooth.families.tokenizer import TINY_WORDS, write_tiny_tokenizer

LATENT_CHANNELS = 16
SHAPES_UNET = dict(SD21_UNET, sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                   block_out_channels=(32, 64, 128, 128), attention_head_dim=(2, 4, 8, 8), cross_attention_dim=128,
                   norm_num_groups=4)
SHAPES_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=128)
SHAPES_VAE = dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1, sample_size=64,
                  block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4)
VOCABULARY = tuple(dict.fromkeys(WORDS + TINY_WORDS))  # the world's words and the tiny model's


def build(seed=0, latent_channels=LATENT_CHANNELS):
    """(tokenizer, text encoder, VAE, U-Net, noise scheduler) with fresh weights from `seed`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(tmp, VOCABULARY, whole_words=True)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=vocab_size - 2,
                                                eos_token_id=vocab_size - 1, **SHAPES_TEXT))
    vae = AutoencoderKL(**dict(SHAPES_VAE, latent_channels=latent_channels))
    unet = UNet2DConditionModel(**dict(SHAPES_UNET, in_channels=latent_channels, out_channels=latent_channels))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, prediction_type="epsilon")
    return tokenizer, text_encoder, vae, unet, scheduler


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, sampler="ddim"):
    """A stock StableDiffusionPipeline of a world's parts: DDIM (what is saved; steps_offset 1, as SD's) or DPM++
    (what the reports sample with), on the parts' own noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False, steps_offset=1)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
