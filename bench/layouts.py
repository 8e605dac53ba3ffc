"""The layouts the speed benchmarks build with random weights (SD 2.1-base, SDXL-base and CPU-sized versions
with their proportions), and the FLOPs of one training step per stage, counted on the meta device."""
import tempfile

import torch

from attndreambooth import families
from attndreambooth.families.sd import SD21_TEXT, SD21_UNET, SD21_VAE
from attndreambooth.families.sdxl import SDXL_TEXT, SDXL_UNET

# SD 2.1-base's proportions at a CPU-sized scale: widths / 4, 128 px. Per image (FLOPs counted):
# U-Net forward 3.06 GF, VAE encoder 4.29 GF (1.40x), text encoder 0.17 GF (5.5 %); SD 2.1-base:
# 804 GF, 1117 GF (1.39x), 45 GF (5.6 %). All 16 cross-attention layers are there.
LAYOUTS = {
    "sd21": dict(family="sd", unet=SD21_UNET, vae=SD21_VAE, text=SD21_TEXT, resolution=512),
    "small": dict(family="sd", unet=dict(SD21_UNET, block_out_channels=(80, 160, 320, 320), cross_attention_dim=256,
                            sample_size=16, norm_num_groups=16),
                  vae=dict(SD21_VAE, block_out_channels=(32, 64, 128, 128), norm_num_groups=16, sample_size=128),
                  text=dict(SD21_TEXT, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=256),
                  resolution=128),
    "sdxl": dict(family="sdxl", unet=SDXL_UNET, vae=dict(SD21_VAE, sample_size=1024), text=SDXL_TEXT[0], text_2=SDXL_TEXT[1],
                 resolution=1024),
    "sdxl_small": dict(family="sdxl", unet=dict(SDXL_UNET, block_out_channels=(80, 160, 320), cross_attention_dim=512,
                                 transformer_layers_per_block=(1, 2, 3), sample_size=16, norm_num_groups=16,
                                 projection_class_embeddings_input_dim=256 + 6 * 256),
                       vae=dict(SD21_VAE, block_out_channels=(32, 64, 128, 128), norm_num_groups=16, sample_size=128),
                       text=dict(SD21_TEXT, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, projection_dim=256),
                       text_2=dict(SD21_TEXT, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, projection_dim=256), resolution=128),
}

def build(layout, device, seed=0):
    """(family, [tokenizers], [text encoders], VAE, U-Net, noise scheduler) of a layout, random weights (an
    SDXL layout has two tokenizers and encoders, the second with its projection)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from attndreambooth.families.tokenizer import write_tiny_tokenizer
    spec = LAYOUTS[layout]
    family = families.by_name(spec["family"])
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp)
        tokenizers = [CLIPTokenizer.from_pretrained(tmp) for _ in family.tokenizer_names]
    torch.manual_seed(seed)
    with torch.device(device):
        encoders = [CLIPTextModel(CLIPTextConfig(**spec["text"]))]
        if "text_2" in spec:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_2"])))
        vae, unet = AutoencoderKL(**spec["vae"]), UNet2DConditionModel(**spec["unet"])
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return (family, tokenizers, [e.requires_grad_(False) for e in encoders], vae.requires_grad_(False), unet,
            scheduler)


def model_flops(layout, batch_size):
    """FLOPs of one training step per stage (U-Net forward + backward, text encoder in stage 1),
    counted on the meta device with eager attention, so every matrix product is seen."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from attndreambooth.config.plan import Plan
    from attndreambooth.config.schema import paper_stages
    from attndreambooth.trainer.concept import add_concept_token
    from attndreambooth.trainer.models import Models, set_trainable
    family, tokenizers, encoders, _, unet, _ = build(layout, "meta")
    unet.set_attn_processor(AttnProcessor())
    add_concept_token(tokenizers[0], encoders[0], "<v>", "toy")
    size, flops = unet.config.sample_size, {}
    dim = unet.config.cross_attention_dim
    for planned in Plan(paper_stages()):
        name, stage = planned.name, planned.config
        set_trainable(planned, Models(family, unet, encoders[:1], None, None, None))
        ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as counter:
            if "embedding" in stage.train:  # SDXL: both encoders run, side by side
                cond = family.encode(encoders, [ids] * len(encoders)).hidden
            else:
                cond = torch.randn(1, 77, dim, device="meta")
            x = torch.randn(batch_size, unet.config.in_channels, size, size, device="meta")
            out = unet(x, torch.zeros(batch_size, device="meta"), cond.expand(batch_size, -1, -1),
                       **family.placeholder_inputs(unet, batch_size, "meta")).sample
            out.float().square().mean().backward()
        flops[name] = counter.get_total_flops()
    return flops
