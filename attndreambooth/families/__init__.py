"""Model families behind one interface (families.base.Family): SD 1.x/2.x, SDXL, FLUX.1 and SD3/SD3.5. Found once
from a model's source (`detect`) or a loaded pipeline (`of_pipeline`), then carried and asked."""
from attndreambooth.families.base import Conditioning, Family
from attndreambooth.families.flux import Flux
from attndreambooth.families.sd import SD
from attndreambooth.families.sd3 import SD3
from attndreambooth.families.sdxl import SDXL

FAMILIES = (Flux(), SD3(), SDXL(), SD())  # asked in this order; the last one takes whatever no other claims
__all__ = ["Conditioning", "Family", "FAMILIES", "Flux", "SD", "SD3", "SDXL", "detect", "of_index", "of_pipeline",
           "of_tiny", "of_checkpoint_keys", "of_name", "by_name"]


def by_name(name):
    """The family called `name` ("sd", "sdxl", "flux", "sd3")."""
    return next(f for f in FAMILIES if f.name == name)


def of_index(model_index):
    """The family of a pipeline folder's (or hub model's) model_index.json."""
    return next((f for f in FAMILIES if f.matches_index(model_index)), FAMILIES[-1])


def of_pipeline(pipe):
    return of_index({"_class_name": type(pipe).__name__})


def of_tiny(layout):
    """The family of a built-in tiny model's name ("tiny", "tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"), or None."""
    return next((f for f in FAMILIES if layout in f.tiny_layouts), None)


def of_checkpoint_keys(keys):
    return next(f for f in FAMILIES if f.matches_checkpoint_keys(keys))


def of_name(name):
    """The family a hub id or file name says, for plans that must not download anything."""
    return next(f for f in FAMILIES if f.matches_name(name))


def detect(kind, where, model_cfg):
    """The family of `model.pretrained` as classified by `source.model_source` (kind, where): a folder's or the
    hub's model_index.json (the hub sends only that file), or a single file's tensor names (a .safetensors;
    a .ckpt is read through `model.single_file_config` only: it is not unpickled to be classified)."""
    if kind == "single_file":
        if model_cfg.single_file_config:
            config = model_cfg.single_file_config
            from pathlib import Path
            return detect("folder" if Path(config).is_dir() else "hub", config, model_cfg)
        if where.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(where, "pt") as f:
                return of_checkpoint_keys(list(f.keys()))
        return FAMILIES[-1]
    from diffusers import DiffusionPipeline
    return of_index(DiffusionPipeline.load_config(where, revision=model_cfg.revision if kind == "hub" else None))
