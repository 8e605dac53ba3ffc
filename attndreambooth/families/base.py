"""What a model family decides, as one interface. A family is found once (`families.detect` for a model
source, `families.of_pipeline` for a loaded pipeline), carried on the run's models, and asked everywhere
else; nothing outside `attndreambooth/families/` tests which family it holds.

To add a family (e.g. a transformer denoiser with joint attention): one new module with a `Family` subclass
that implements the methods below, and one line in `families/__init__.py`'s FAMILIES."""
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attndreambooth.families import unet as unet_naming


@dataclass
class Conditioning:
    """A prompt's conditioning of the denoiser: the text's hidden states (B, tokens, D) and the denoiser's
    other text-derived inputs by name (SDXL: the pooled text embedding as `text_embeds`)."""
    hidden: torch.Tensor
    extra: dict = field(default_factory=dict)

    def float(self):
        return Conditioning(self.hidden.float(), {k: v.float() for k, v in self.extra.items()})

    def expand(self, batch):
        """The one prompt's conditioning broadcast over a batch."""
        return Conditioning(self.hidden.expand(batch, -1, -1), {k: v.expand(batch, -1) for k, v in self.extra.items()})

    def cat(self, other):
        """This batch's conditioning followed by `other`'s (in this one's dtype)."""
        join = lambda a, b: torch.cat([a, b.to(a.dtype)])  # noqa: E731
        return Conditioning(join(self.hidden, other.hidden), {k: join(v, other.extra[k]) for k, v in self.extra.items()})


class Family(ABC):
    """The defaults are those of a UNet2DConditionModel with one CLIP text encoder (SD 1.x/2.x); a family
    must give its own layouts and tiny model (the abstract methods)."""
    name = "base"
    pipeline_class = "StableDiffusionPipeline"  # diffusers' class name
    text_encoder_names = ("text_encoder",)  # the pipeline's components, in conditioning order
    tokenizer_names = ("tokenizer",)
    lora_targets = unet_naming.LORA_TARGETS
    denoiser_name = "unet"  # the pipeline's denoiser component (a U-Net, or a transformer)
    embedding_kind = "an SD embedding (one text encoder)"  # how messages name its embedding files and its models
    model_kind = "not an SDXL model"
    sd_only_options = ()  # config keys (with the value that is off) this family cannot honour
    patch = 1  # latent pixels per denoiser token along a side (a transformer's patch)
    memory_by_accounting = False  # trainer/memory.py: activations by saved-tensor accounting, not the U-Net fit
    samplers = ("dpm++", "ddim", "euler", "euler_a", "pndm", "ddpm")  # infer.py's names it can use; first: default
    guidance_scale = 7.5  # infer.py's default guidance

    # -- recognising it -----------------------------------------------------------------------------------
    def matches_index(self, model_index):
        """True for a pipeline folder's model_index.json of this family."""
        return model_index.get("_class_name") == self.pipeline_class

    def matches_checkpoint_keys(self, keys):
        """True for an original-format single file (its tensor names) of this family."""
        return False

    def matches_name(self, name):
        """True for a hub id or file name that says this family (plans without a download)."""
        return False

    # -- the pipeline's parts -------------------------------------------------------------------------
    def pipeline_cls(self):
        import diffusers
        return getattr(diffusers, self.pipeline_class)

    def configured(self, model_cfg):
        """The family with the run's model options applied (a family that has none returns itself)."""
        return self

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_name)

    def text_encoders(self, pipe):
        return [getattr(pipe, n) for n in self.text_encoder_names]

    def tokenizers(self, pipe):
        return [getattr(pipe, n) for n in self.tokenizer_names]

    def components(self, pipe):
        """The pipeline's models by component name (a validation pipeline is rebuilt from them)."""
        names = ("vae", self.denoiser_name, "scheduler", *self.text_encoder_names, *self.tokenizer_names)
        return {n: getattr(pipe, n) for n in names}

    def pipeline(self, components):
        """A sampling pipeline around already loaded models."""
        return self.pipeline_cls()(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    def default_side(self, pipe):
        """The side in pixels the pipeline samples at when none is given."""
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def load_kwargs(self):
        """Extra keyword arguments of `from_pretrained` / `from_single_file`."""
        return dict(safety_checker=None, requires_safety_checker=False)

    def token_lengths(self, tokenizers):
        """How many tokens each tokenizer's ids have, as the family's pipeline pads a prompt."""
        return [t.model_max_length for t in tokenizers]

    # -- conditioning --------------------------------------------------------------------------------
    def encode(self, text_encoders, input_ids):
        """Conditioning of token ids (one tensor per tokenizer, (B, 77)), as the family's pipeline encodes."""
        return Conditioning(text_encoders[0](input_ids[0])[0])

    def training_scheduler(self, scheduler_config):
        """The noise schedule training draws from (the pipeline's sampler's config, the training process)."""
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(scheduler_config)

    def timesteps(self, noise_scheduler, batch, generator):
        """A batch's training timesteps, drawn on `generator`'s device: uniform over the schedule's steps."""
        return torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator,
                             device=generator.device)

    def latent_shift(self, vae_config):
        """What is subtracted from the VAE's latents before its scaling factor multiplies them (FLUX.1, SD3)."""
        return vae_config.get("shift_factor") or 0.0

    def noised(self, noise_scheduler, latents, noise, timesteps):
        """(the denoiser's noisy input, its training target): DDPM's forward process; the target is the noise,
        or v for a v-prediction schedule."""
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            return noisy, noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    needs_view_geometry = False  # whether the denoiser takes each view's size and crop (SDXL's time_ids)

    def predict(self, denoiser, noisy, timesteps, cond, view_geometry=None):
        """The denoiser's prediction for a batch with its conditioning (a Conditioning of the same batch)."""
        return denoiser(noisy, timesteps, encoder_hidden_states=cond.hidden).sample

    def shape_call(self, unet, side):
        """The denoiser on zeros for one sample of a `side`-wide latent (on the meta device: shapes only)."""
        c = unet.config
        return unet(torch.zeros(1, c.in_channels, side, side), torch.zeros(1), torch.zeros(1, 77, c.cross_attention_dim),
                    **self.placeholder_inputs(unet, 1))

    def placeholder_inputs(self, unet, batch_size, device=None):
        """Zero text-derived inputs besides the hidden states, for shape-only work (FLOP, activation counts)."""
        return {}

    # -- the denoiser's layers (the U-Net's naming) --------------------------------------------------------
    def cross_attention_layers(self, unet):
        return unet_naming.cross_attention_layers(unet)

    def map_layers(self, unet, reg_cfg):
        """{processor name: grid factor} of the layers Eq. 2 may read, before `reg.map_sizes` selects."""
        return self.cross_attention_layers(unet)

    def map_positions(self, positions):
        """The token positions ([V], category) the maps are read at, from each tokenizer's [V, category]."""
        if any(p != positions[0] for p in positions):
            raise ValueError(f"the tokenizers place [V] and the category differently ({positions[1:]} vs "
                             f"{positions[0]}); the regulariser needs one position for all")
        return positions[0]

    map_tokenizer = 0  # which tokenizer's tokens the maps are over (infer.py's attention figures)
    maps_title = "cross-attention"

    def token_maps(self, unet, expected_layers=None):
        """A capture of every text token's map in every cross-attention layer (infer.py --attention_maps)."""
        from attention_reg import CrossAttentionCapture
        return CrossAttentionCapture(unet, None, expected_layers)

    def capture(self, unet, columns, layers, reg_cfg, expected_layers=None, text_len=None):
        """The context that records [V]'s and the category's maps in `layers` while the denoiser runs."""
        from attention_reg import CrossAttentionCapture
        return CrossAttentionCapture(unet, columns, expected_layers, layers)

    def is_cross_attention(self, name):
        return unet_naming.is_cross_attention(name)

    def cross_attention_state(self, unet):
        return unet_naming.cross_attention_state(unet)

    def save_lora_weights(self, folder, state, weight_name):
        """A LoRA of the denoiser (peft's keys) as diffusers' `load_lora_weights` reads it."""
        from diffusers import StableDiffusionPipeline
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=weight_name,
                                                  safe_serialization=True)

    def kohya_lora(self, state):
        """A LoRA of the denoiser (peft's keys: "<module>.lora_A.weight") in kohya's format, which ComfyUI,
        AUTOMATIC1111 and kohya's scripts read: "lora_unet_<module, dots as _>.lora_down.weight", ".lora_up",
        ".alpha" (= the rank: scale 1, as the diffusers file); diffusers' own converter."""
        from diffusers.utils import convert_state_dict_to_kohya
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        return {k: v.float() if k.endswith(".alpha") else v for k, v in kohya.items()}  # kohya writes alpha as a float

    # -- the concept's embedding files -------------------------------------------------------------------
    embedding_keys = ()  # one tensor per text encoder under these names (SDXL, FLUX.1, SD3); () = SD's format

    def embedding_files(self, rows, placeholder):
        """{file name: tensors}. SD: diffusers' format ({placeholder: (1, dim)}, as diffusers' textual-inversion
        script saves it; a 1-D row would be read as `dim` vectors by kohya's generator) and A1111 / ComfyUI's
        ({"emb_params": (1, dim)}). Several encoders: one (1, dim) tensor per encoder under `embedding_keys`."""
        if self.embedding_keys:
            return {"learned_embeds.safetensors": {k: row.detach()[None] for k, row in zip(self.embedding_keys, rows)}}
        return {"learned_embeds.safetensors": {placeholder: rows[0][None]},
                "embedding_a1111.safetensors": {"emb_params": rows[0][None]}}

    def is_own_embedding(self, keys):
        """True if an embedding file's tensor names are this family's format."""
        if self.embedding_keys:
            return set(keys) == set(self.embedding_keys)
        return not set(keys) & {"clip_l", "clip_g", "t5"}

    def load_embedding(self, pipe, path, token):
        """An embedding file of the family's format into the pipeline (`token`: the word for a format that
        does not carry one; diffusers' own format does). Several encoders: each row into its tokenizer and
        encoder (diffusers' load_textual_inversion takes one encoder a call; the calls docs/inference.md
        gives users)."""
        if not self.embedding_keys:
            pipe.load_textual_inversion(str(path))
            return
        from safetensors.torch import load_file
        state = load_file(path)
        for key, encoder, tokenizer in zip(self.embedding_keys, self.text_encoders(pipe), self.tokenizers(pipe)):
            pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)

    # -- layouts without weights and the tiny model (each family's own: no default) ------------------------
    tiny_layouts = ()  # the built-in tiny models' names ("tiny", ...)

    def meta_layout_of_folder(self, folder):
        """(denoiser, [text encoders], VAE) of a pipeline folder, from its configs, on the meta device."""
        import diffusers
        import transformers
        from diffusers import AutoencoderKL

        def model(sub, library):
            config = json.loads((Path(folder) / sub / "config.json").read_text())
            cls = getattr(library, config.get("_class_name") or (config.get("architectures") or ["CLIPTextModel"])[0])
            if library is diffusers:
                return cls.from_config(cls.load_config(folder, subfolder=sub))
            return cls(cls.config_class.from_pretrained(folder, subfolder=sub))

        with torch.device("meta"):
            return (model(self.denoiser_name, diffusers), [model(sub, transformers) for sub in self.text_encoder_names],
                    AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")))

    @abstractmethod
    def meta_layout(self, name):
        """(label, U-Net, [text encoders], VAE) of the family's published layout (for a hub id or file `name`)
        on the meta device."""

    @abstractmethod
    def meta_layout_of_checkpoint(self, keys):
        """The same for an original-format single file, from its tensor names."""

    @abstractmethod
    def build_tiny(self, folder, layout):
        """Save the family's tiny model with random weights (`layout` names a variant) to `folder`."""
