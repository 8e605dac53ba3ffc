"""Where a model comes from and how it loads: `model.pretrained` classified (built-in tiny model, diffusers
folder, single file, hub id), its family found once, the pipeline loaded, or its shapes alone on the meta
device (for plans, memory estimates and checks that must come before any download)."""
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from attndreambooth import families
from attndreambooth.config.checks import looks_like_hub_id

TINY_VERSION = 1
# Library messages a user cannot act on, silenced where they are made (logger, words); everything else stays.
NOISE = (("diffusers.models.modeling_utils", "should be kept in float32: []"),  # casting a model with none such
         ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),  # PIL serves
         ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),  # importing torchao
         ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"))  # ditto


class _Drop(logging.Filter):
    def __init__(self, words):
        super().__init__()
        self.words = words

    def filter(self, record):
        return self.words not in record.getMessage()


def quiet_known_noise():
    """Silence NOISE for this process (the command-line tools call it first); idempotent."""
    for name, words in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.words == words for f in logger.filters):
            logger.addFilter(_Drop(words))


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
    """Folder of a built-in tiny model ("tiny": SD 2.x layout, "tiny-sd15": SD 1.5's, "tiny-sdxl": SDXL's),
    built once per machine by its family."""
    family = families.of_tiny(layout)
    return cached_build(f"{layout}-v{TINY_VERSION}", lambda folder: family.build_tiny(folder, layout))


def tiny_layouts():
    return [name for f in families.FAMILIES for name in f.tiny_layouts]


def model_source(model_cfg):
    """Classify `model.pretrained` as ("folder" | "single_file" | "hub", location); fail early on bad paths."""
    name = model_cfg.pretrained
    if name in tiny_layouts():
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


def family_of(model_cfg):
    """The family of `model.pretrained` (reads model_index.json, or a single file's tensor names)."""
    return families.detect(*model_source(model_cfg), model_cfg)


def load_pipeline(model_cfg, torch_dtype=torch.float32):
    """(pipeline, family) of `model.pretrained`: a hub id, a diffusers folder or a single-file checkpoint, in
    its family's pipeline class."""
    kind, where = model_source(model_cfg)
    family = families.detect(kind, where, model_cfg)
    cls, kwargs = family.pipeline_cls(), dict(dtype=torch_dtype, **family.load_kwargs())
    if model_cfg.vae:  # e.g. SDXL's fp16-fix VAE: the stock one overflows in fp16
        from diffusers import AutoencoderKL
        kwargs["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae, dtype=torch_dtype)
    if kind == "single_file":
        if model_cfg.single_file_config:
            kwargs["config"] = model_cfg.single_file_config
        return cls.from_single_file(where, **kwargs), family
    return cls.from_pretrained(where, revision=model_cfg.revision, **kwargs), family


def save_pipeline(pipe, folder, dtype):
    """Save a pipeline with its weights in `dtype`, so that the stock call without a dtype argument works:
    diffusers loads its models in fp32 then, but transformers would keep a text encoder's saved half
    precision (its config's `dtype`) and the first call would fail (Half and Float); so the text encoders'
    configs say float32 and they are upcast on load, as the U-Net is. The files on disk stay in `dtype`;
    `from_pretrained(folder, torch_dtype=torch.float16)` loads everything in half precision."""
    pipe.to("cpu", dtype).save_pretrained(folder, safe_serialization=True)
    for config in Path(folder).glob("text_encoder*/config.json"):
        fields = json.loads(config.read_text())
        if fields.get("dtype", "float32") != "float32":
            fields["dtype"] = "float32"
            config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def replace_pipeline(pipe, folder, dtype):
    """save_pipeline into `folder` atomically: written beside it, then renamed over it (a kill mid-write
    leaves the previous folder or none, never half of one)."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(pipe, tmp, dtype)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def plan_family(kind, where):
    """The family of a hub id or single file without a download: a .safetensors file by its tensor names, else
    the name (a plan reads no weights)."""
    if kind == "single_file" and where.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(where, "pt") as f:
            return families.of_checkpoint_keys(list(f.keys())), list(f.keys())
    return families.of_name(where), None


@dataclass
class Layout:
    """A model's shapes without its weights (its modules on the meta device), and where they came from."""
    source: str  # the folder, or which built-in layout stood in for a hub id or single file
    unet: object
    text_encoders: list
    vae: object
    family: object


def meta_models(cfg):
    """The model's Layout on the meta device (shapes only): the model's own configs for a folder; for a hub id
    or single file (no download for a plan) the built-in layout of its family (SDXL-base, SD 1.5 or SD
    2.1-base)."""
    kind, where = model_source(cfg.model)
    if kind == "folder":
        family = families.of_index(json.loads((Path(where) / "model_index.json").read_text()))
        return Layout(where, *family.meta_layout_of_folder(where), family)
    family, keys = plan_family(kind, where)
    label, unet, texts, vae = family.meta_layout_of_checkpoint(keys) if keys else family.meta_layout(where)
    return Layout(label, unet, texts, vae, family)
