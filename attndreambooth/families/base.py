"""What a model family decides, as one interface. A family is found once (`families.detect` for a model
source, `families.of_pipeline` for a loaded pipeline), carried on the run's models, and asked everywhere
else; nothing outside `attndreambooth/families/` tests which family it holds.

To add a family (e.g. a transformer denoiser with joint attention): one new module with a `Family` subclass
that implements the methods below, and one line in `families/__init__.py`'s FAMILIES."""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

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
    embedding_kind = "an SD embedding (one text encoder)"  # how messages name its embedding files and its models
    model_kind = "not an SDXL model"

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

    def text_encoders(self, pipe):
        return [getattr(pipe, n) for n in self.text_encoder_names]

    def tokenizers(self, pipe):
        return [getattr(pipe, n) for n in self.tokenizer_names]

    def components(self, pipe):
        """The pipeline's models by component name (a validation pipeline is rebuilt from them)."""
        names = ("vae", "unet", "scheduler", *self.text_encoder_names, *self.tokenizer_names)
        return {n: getattr(pipe, n) for n in names}

    def pipeline(self, components):
        """A sampling pipeline around already loaded models."""
        return self.pipeline_cls()(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    def load_kwargs(self):
        """Extra keyword arguments of `from_pretrained` / `from_single_file`."""
        return dict(safety_checker=None, requires_safety_checker=False)

    # -- conditioning --------------------------------------------------------------------------------
    def encode(self, text_encoders, input_ids):
        """Conditioning of token ids (one tensor per tokenizer, (B, 77)), as the family's pipeline encodes."""
        return Conditioning(text_encoders[0](input_ids[0])[0])

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

    def placeholder_inputs(self, unet, batch_size, device=None):
        """Zero text-derived inputs besides the hidden states, for shape-only work (FLOP, activation counts)."""
        return {}

    # -- the denoiser's layers (the U-Net's naming) --------------------------------------------------------
    def cross_attention_layers(self, unet):
        return unet_naming.cross_attention_layers(unet)

    def is_cross_attention(self, name):
        return unet_naming.is_cross_attention(name)

    def cross_attention_state(self, unet):
        return unet_naming.cross_attention_state(unet)

    def kohya_lora(self, state):
        """A LoRA of the denoiser (peft's keys: "<module>.lora_A.weight") in kohya's format, which ComfyUI,
        AUTOMATIC1111 and kohya's scripts read: "lora_unet_<module, dots as _>.lora_down.weight", ".lora_up",
        ".alpha" (= the rank: scale 1, as the diffusers file); diffusers' own converter."""
        from diffusers.utils import convert_state_dict_to_kohya
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        return {k: v.float() if k.endswith(".alpha") else v for k, v in kohya.items()}  # kohya writes alpha as a float

    # -- the concept's embedding files -------------------------------------------------------------------
    def embedding_files(self, rows, placeholder):
        """{file name: tensors}: diffusers' format ({placeholder: (1, dim)}, as diffusers' textual-inversion
        script saves it; a 1-D row would be read as `dim` vectors by kohya's generator) and A1111 / ComfyUI's
        ({"emb_params": (1, dim)})."""
        return {"learned_embeds.safetensors": {placeholder: rows[0][None]},
                "embedding_a1111.safetensors": {"emb_params": rows[0][None]}}

    def is_own_embedding(self, keys):
        """True if an embedding file's tensor names are this family's format."""
        return not ({"clip_l", "clip_g"} <= set(keys))

    def load_embedding(self, pipe, path, token):
        """An embedding file of the family's format into the pipeline (`token`: the word for a format that
        does not carry one; diffusers' own format does)."""
        pipe.load_textual_inversion(str(path))

    # -- layouts without weights and the tiny model (each family's own: no default) ------------------------
    tiny_layouts = ()  # the built-in tiny models' names ("tiny", ...)

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
