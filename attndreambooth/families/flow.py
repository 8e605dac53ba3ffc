"""What the rectified-flow transformer families (FLUX.1, SD3) share: the training objective of diffusers'
scripts, their sampler, their 2x2 patches, their keyed embedding files and their captures' layer selection.

Objective (diffusers' train_dreambooth_*_flux / _sd3): u from the timestep density (`density`: "none" is
uniform, FLUX.1's default there; "logit_normal" SD3's), timestep = the schedule's timesteps[u * 1000] (sigma *
1000, SD3's shift already in its schedule), noisy = (1 - sigma) x + sigma e, target e - x, unweighted MSE
(both scripts' default loss weighting is 1 for these densities)."""
import re
from abc import abstractmethod

import torch

from attndreambooth.families.base import Family


class RectifiedFlow(Family):
    patch = 2  # the transformer's tokens are 2x2 latent pixels
    memory_by_accounting = True  # no transformer step has been measured on a GPU to fit a factor to
    samplers = ("flow_euler",)
    density = "none"
    stage2 = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn\.(to_q|add_k_proj|add_v_proj|to_out\.0)\.")
    joint_blocks = re.compile(r"transformer_blocks\.\d+\.attn\.processor")
    block = re.compile(r"(single_)?transformer_blocks\.\d+")
    # options of the U-Net families that mean nothing here, with the value that leaves them off
    sd_only_options = (("model.cross_attention_layers", None), ("reg.map_sizes", None),
                       ("runtime.channels_last", False), ("runtime.cuda_graph", False), ("prior.enabled", False))

    def pipeline(self, components):
        return self.pipeline_cls()(**components)

    def load_kwargs(self):
        return {}

    def default_side(self, pipe):
        return pipe.default_sample_size * pipe.vae_scale_factor

    def training_scheduler(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def timesteps(self, noise_scheduler, batch, generator):
        """The schedule's timesteps (sigma * 1000) at indices drawn from the density, as diffusers' scripts do."""
        from diffusers.training_utils import compute_density_for_timestep_sampling
        u = compute_density_for_timestep_sampling(self.density, batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                  device=generator.device, generator=generator)
        index = (u * noise_scheduler.config.num_train_timesteps).long()
        return noise_scheduler.timesteps.to(index.device)[index]

    def noised(self, noise_scheduler, latents, noise, timesteps):
        """Rectified flow: noisy = (1 - sigma) x + sigma e, target e - x, sigma = t / 1000."""
        sigma = (timesteps.float() / noise_scheduler.config.num_train_timesteps).view(-1, 1, 1, 1).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def is_cross_attention(self, name):
        return bool(self.stage2.search(name))

    def cross_attention_state(self, transformer):
        return {n: p for n, p in transformer.state_dict().items() if self.is_cross_attention(n)}

    def map_layers(self, transformer, reg_cfg):
        """The joint-attention blocks with their own text stream (FLUX.1's double-stream blocks, SD3's joint
        blocks); with `reg.joint_blocks=all` FLUX.1's single-stream blocks too."""
        layers = self.cross_attention_layers(transformer)
        if reg_cfg.joint_blocks == "all":
            return layers
        return {n: f for n, f in layers.items() if self.joint_blocks.fullmatch(n)}

    def token_maps(self, transformer, expected_layers=None):
        """Every text token's map (renormalised over the text keys) in the blocks Eq. 2 reads by default."""
        from attndreambooth.config.schema import RegConfig
        reg = RegConfig()
        return self.capture(transformer, list(range(self.text_tokens)), list(self.map_layers(transformer, reg)), reg)

    def save_lora_weights(self, folder, state, weight_name):
        self.pipeline_cls().save_lora_weights(folder, transformer_lora_layers=state, weight_name=weight_name,
                                              safe_serialization=True)

    def kohya_lora(self, state):
        return None  # ComfyUI reads the diffusers file itself for these models (docs/lora.md)

    @abstractmethod
    def shape_inputs(self, transformer, side):
        """Zero conditioning for a shape-only call (a Conditioning of one sample): each family's own widths."""

    def latent_channels(self, transformer):
        """The VAE latent's channels (FLUX.1's transformer takes them already packed 2x2, four times as many)."""
        return transformer.config.in_channels // (4 if transformer.config.patch_size == 1 else 1)

    def checkpointed_blocks(self, transformer):
        """The blocks gradient checkpointing recomputes (diffusers checkpoints each one whole)."""
        return [m for n, m in transformer.named_modules() if self.block.fullmatch(n)]

    def shape_call(self, transformer, side):
        channels = self.latent_channels(transformer)
        return self.predict(transformer, torch.zeros(1, channels, side, side), torch.zeros(1),
                            self.shape_inputs(transformer, side))
