"""Loading Stable Diffusion (hub id, diffusers folder, single file, or the built-in tiny model),
the [V] token, and what each stage trains."""
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from attndreambooth.config_checks import looks_like_hub_id

log = logging.getLogger(__name__)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# SD 2.1-base, from its published configs: used to count parameters and to build the
# layout on the meta device (no weights, no download).
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
# SD 1.x (1.5, 1.4): attn2 with conv projections, 8 heads everywhere, 768-d cross-attention; CLIP ViT-L/14 text
SD15_UNET = dict(SD21_UNET, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)
SD15_TEXT = dict(SD21_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
# The tiny model: SD 2.x layout (4 levels, 16 attn2 layers, linear projections), tiny widths.
TINY_VERSION = 1
TINY_UNET = dict(SD21_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
                 cross_attention_dim=32, norm_num_groups=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
TINY_VAE = dict(SD21_VAE, sample_size=64, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
# The tiny SD 1.5 layout: what SD 1.5 differs in from SD 2.x (attn2 with conv projections and one head count
# everywhere, a quick-GELU CLIP text encoder, padding with <|endoftext|>); the same 16 cross-attention layers.
TINY15_UNET = dict(TINY_UNET, attention_head_dim=4, use_linear_projection=False)
TINY15_TEXT = dict(TINY_TEXT, hidden_act="quick_gelu")
TINY_LAYOUTS = {"tiny": (TINY_UNET, TINY_TEXT, "!"), "tiny-sd15": (TINY15_UNET, TINY15_TEXT, "<|endoftext|>"),
                "tiny-sdxl": None}  # the tiny SDXL layout lives in sdxl.py
TINY_WORDS = ("a an the of in on with photo picture painting oil drawing sketch watercolor style toy dog cat "
              "bear backpack bowl boot can candle clock sneaker glasses teapot vase stuffed animal cartoon robot "
              "surfing wave beach snow jungle city mountain forest box inside top wooden floor red blue green "
              "purple pink fabric rug street background wheat field house sitting wearing hat").split()


def _bytes_to_unicode():
    """CLIP's byte -> printable character table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder, words=TINY_WORDS, pad_token="!"):
    """A CLIP BPE tokenizer made in code: byte alphabet + merges for a word list (each word becomes one token);
    pads with "!" like SD 2.x (SD 1.x pads with <|endoftext|>)."""
    alphabet = _bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges = list(dict.fromkeys(merges))
    vocab += [m.replace(" ", "") for m in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad_token)))
    return len(vocab)


def build_tiny_pipeline(folder, seed=0, layout="tiny"):
    """Build a tiny pipeline with random weights from `seed` and save it as a diffusers folder: the SD 2.x
    layout ("tiny") or SD 1.5's ("tiny-sd15")."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, text_cfg, pad = TINY_LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(tmp, pad_token=pad)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, **text_cfg))
    vae = AutoencoderKL(**TINY_VAE)
    unet = UNet2DConditionModel(**unet_cfg)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def cached_build(name, build):
    """A folder in the cache (ATTNDB_CACHE or ~/.cache/attndreambooth), made once by `build(folder)`;
    built under a temporary name and renamed, so concurrent builds are safe."""
    cache = Path(os.environ.get("ATTNDB_CACHE", Path.home() / ".cache" / "attndreambooth"))
    folder = cache / name
    if not (folder / ".complete").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
        build(tmp)
        (tmp / ".complete").touch()
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_model_dir(layout="tiny"):
    """Folder of a tiny model ("tiny": SD 2.x layout, "tiny-sd15": SD 1.5's, "tiny-sdxl": SDXL's), built once
    per machine."""
    from attndreambooth.sdxl import build_tiny_sdxl_pipeline
    build = build_tiny_sdxl_pipeline if layout == "tiny-sdxl" else lambda folder: build_tiny_pipeline(folder, layout=layout)
    return cached_build(f"{layout}-v{TINY_VERSION}", build)


def model_source(model_cfg):
    """Classify `model.pretrained` as ("folder" | "single_file" | "hub", location); fail early on bad paths."""
    name = model_cfg.pretrained
    if name in TINY_LAYOUTS:
        return "folder", str(tiny_model_dir(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained: {path} has no model_index.json; give a diffusers pipeline "
                                    "folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return "folder", str(path)
    if path.suffix in (".safetensors", ".ckpt"):
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: checkpoint file {path} does not exist")
        return "single_file", str(path)
    if not looks_like_hub_id(name):
        raise FileNotFoundError(f"model.pretrained: {name!r} is neither a diffusers folder, a .safetensors/.ckpt "
                                "file, nor a hub id of the form owner/name")
    return "hub", name


def load_pipeline(model_cfg, torch_dtype=torch.float32):
    """Load a StableDiffusionPipeline, or a StableDiffusionXLPipeline for an SDXL base, from a hub id, a
    diffusers folder or a single-file checkpoint."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from attndreambooth.sdxl import is_sdxl_model
    kind, where = model_source(model_cfg)
    if is_sdxl_model(kind, where, model_cfg):
        cls, kwargs = StableDiffusionXLPipeline, dict(dtype=torch_dtype)
    else:
        cls, kwargs = StableDiffusionPipeline, dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    if model_cfg.vae:  # e.g. SDXL's fp16-fix VAE: the stock one overflows in fp16
        from diffusers import AutoencoderKL
        kwargs["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae, dtype=torch_dtype)
    if kind == "single_file":
        if model_cfg.single_file_config:
            kwargs["config"] = model_cfg.single_file_config
        return cls.from_single_file(where, **kwargs)
    return cls.from_pretrained(where, revision=model_cfg.revision, **kwargs)


class ConceptEmbedding(nn.Module):
    """Token embedding whose [V] row is a trainable parameter; every other row stays frozen.

    Stage 1 trains only this row (METHOD.md); weight decay then touches [V] alone, as in
    the released code, and DDP all-reduces its gradient since it lives in the model.
    """

    def __init__(self, base: nn.Embedding, token_id: int, init: torch.Tensor):
        super().__init__()
        self.base, self.token_id = base, token_id
        self.row = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self):  # the matrix as a plain embedding would hold it, [V] row included
        return merged_embedding_matrix(self)

    def forward(self, input_ids):
        emb = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))  # (B, 77, dim)
        is_concept = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(is_concept, self.row.to(emb.dtype), emb)


def merged_embedding_matrix(concept: ConceptEmbedding):
    """The base embedding matrix with the [V] row written in (grown by one row if needed)."""
    w = concept.base.weight.detach()
    if concept.token_id >= w.shape[0]:
        w = torch.cat([w, w.new_zeros(concept.token_id + 1 - w.shape[0], w.shape[1])])
    w = w.clone()
    w[concept.token_id] = concept.row.detach().to(w.dtype)
    return w


def is_known_word(tokenizer, word):
    """True if `word` is in the vocabulary or tokenizes to one existing token ("dog" is "dog</w>")."""
    return word in tokenizer.get_vocab() or len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def add_concept_token(tokenizer, text_encoder, placeholder, category, init_token=None):
    """Add [V] to the tokenizer and wrap the text encoder's token embedding; [V] starts as the category's
    first sub-token (the released code's choice), or as `init_token`'s. Returns (token id, category
    sub-token ids)."""
    if is_known_word(tokenizer, placeholder) or tokenizer.add_tokens(placeholder) != 1:
        raise ValueError(f"data.placeholder {placeholder!r} already exists in the tokenizer's vocabulary; "
                         "choose a new word, e.g. <v> or sks_token")
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    category_ids = tokenizer(category, add_special_tokens=False).input_ids
    init_id = category_ids[0] if init_token is None else tokenizer(init_token, add_special_tokens=False).input_ids[0]
    base = text_encoder.get_input_embeddings()
    base.requires_grad_(False)
    text_encoder.set_input_embeddings(ConceptEmbedding(base, token_id, base.weight[init_id]))
    return token_id, category_ids


def encode_prompt(tokenizer, prompt, token_id, category_ids):
    """Token ids (1, 77) of the training prompt and the positions of [V] and of the category's first
    sub-token after it. Found by id: SD 2.x pads with "!", not with the end token."""
    input_ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    ids = input_ids[0].tolist()
    if ids.count(token_id) != 1:
        raise ValueError(f"data.prompt_template: the training prompt {prompt!r} must hold the placeholder "
                         "exactly once within the tokenizer's 77 tokens")
    v_pos = ids.index(token_id)
    cat_pos = next((i for i in range(v_pos + 1, len(ids)) if ids[i] == category_ids[0]), None)
    if cat_pos is None:
        raise ValueError(f"data.prompt_template: the category must follow the placeholder in the training "
                         f"prompt {prompt!r} (the regulariser compares their attention)")
    return input_ids, v_pos, cat_pos


def bake_concept(text_encoder):
    """Replace the ConceptEmbedding by a plain nn.Embedding holding the learned row (for saving)."""
    concept = text_encoder.get_input_embeddings()
    if isinstance(concept, ConceptEmbedding):
        weight = merged_embedding_matrix(concept)
        text_encoder.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=True))
        text_encoder.config.vocab_size = weight.shape[0]
    return text_encoder


def trainable_parameters(part, unet, text_encoder, adapter=None, text_encoder_2=None):
    """The parameters, by name, that a stage's `train` entry names: embedding ([V] row; SDXL: a row in each
    encoder), cross_attention (attn2), unet; with `adapter` (a LoRA stage) the U-Net parts are that adapter's
    factors; "lora" is every adapter's. The names also key checkpoints."""
    from attndreambooth.lora import adapter_parameters
    if part == "embedding":
        rows = {"concept.row": text_encoder.get_input_embeddings().row}
        if text_encoder_2 is not None:
            rows["concept.row_2"] = text_encoder_2.get_input_embeddings().row
        return rows
    if part == "lora" or (adapter is not None and part in ("cross_attention", "unet")):
        return {f"unet.{n}": p for n, p in adapter_parameters(unet, adapter).items()}
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if ".lora_" not in n}
    if part == "cross_attention":
        return {n: p for n, p in named.items() if ".attn2." in n}
    if part == "unet":
        return named
    raise ValueError(f"unknown trainable part {part!r}")


def regularised_layers(unet, map_sizes, resolution):
    """The attn2 processor names whose maps Eq. 2 averages: all, or those whose map side at `resolution` px is
    in `map_sizes`; refuses a selection that matches no layer."""
    from attention_reg import cross_attention_layers
    latent, layers = resolution // 8, cross_attention_layers(unet)
    if map_sizes is None:
        return list(layers)
    chosen = [name for name, factor in layers.items() if latent // factor in map_sizes]
    if not chosen:
        sizes = sorted({latent // f for f in layers.values()}, reverse=True)
        raise ValueError(f"config key 'reg.map_sizes': {list(map_sizes)} matches no cross-attention layer; at "
                         f"data.resolution={resolution} this U-Net's maps are {sizes} px on a side")
    return chosen


def sd21_layout(device="meta", unet=SD21_UNET, text=SD21_TEXT):
    """SD 2.1-base U-Net and text encoder built from config (meta device: shapes only, no memory); with
    SD15_UNET and SD15_TEXT, SD 1.5's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return UNet2DConditionModel(**unet), CLIPTextModel(CLIPTextConfig(**text))
