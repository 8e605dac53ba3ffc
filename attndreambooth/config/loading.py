"""The config read: defaults <- a YAML file (and the files its `base:` names) <- dotted key=value overrides,
every mistake named by its key and file, then validated (config.checks); and the resolved config as YAML."""
import dataclasses
import os
import re
from pathlib import Path
from typing import Dict

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attndreambooth.config.checks import validate
from attndreambooth.config.schema import CARD_PRESETS, MEMORY_PRESETS, Config, ConfigError, StageConfig


def _parse_value(text):
    if not text.strip():
        return text  # `key=` means the empty string, which validate() then names
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _config_chain(path, seen=()):
    """The YAML layers of a config file, its `base:` (a path relative to it) first."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: its `base:` chain loops")
    try:
        layer = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        raise ConfigError(f"config file {path}, line {mark.line + 1} column {mark.column + 1}: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not YAML: {e}") from None
    if not isinstance(layer, dict):
        raise ConfigError(f"config file {path} holds a {type(layer).__name__}, not a mapping of keys "
                          "(e.g. `data: {category: dog}`)")
    base = layer.pop("base", None)
    if base is None:
        return [(path, layer)]
    if not (path.parent / base).is_file():
        raise ConfigError(f"config file {path}: `base: {base}` is {path.parent / base}, which does not exist "
                          "(a base path is relative to the file naming it)")
    return _config_chain(path.parent / base, (*seen, path.resolve())) + [(path, layer)]


def _not_a_mapping(layer, schema, prefix=""):
    """(key, value) of the first place in a YAML layer with a value where `schema` has a group of keys (OmegaConf
    names no key for these); None if there is none."""
    def group(value, inner_schema, here):
        return (here, value) if not isinstance(value, dict) else _not_a_mapping(value, inner_schema, here + ".")

    types = {f.name: f.type for f in dataclasses.fields(schema)}
    for key, value in layer.items():
        kind, here = types.get(key), prefix + key
        if kind == Dict[str, StageConfig]:  # stages: a group of groups
            found = (here, value) if not isinstance(value, dict) else next(
                filter(None, (group(v, StageConfig, f"{here}.{name}") for name, v in value.items())), None)
        else:
            found = group(value, kind, here) if dataclasses.is_dataclass(kind) else None
        if found:
            return found
    return None


def _plain(e):
    """OmegaConf's message in the config's own terms."""
    text = str(e).splitlines()[0]
    if "is not a ListConfig" in text:
        return "must be a list, e.g. [a, b] (one item: [a])"
    if re.search(r"is not a subclass of|Cannot assign \w+ to Dict", text):
        return "is a group of keys, not one value (YAML: `key: {name: value}`; command line: key.name=value)"
    return text


def load_config(config_file=None, overrides=(), check=True):
    """Merge defaults, a YAML file and `key=value` overrides; validate (unless `check` is False,
    e.g. to read a finished run's config elsewhere); return a typed config."""
    cfg = OmegaConf.structured(Config)
    if config_file is not None:
        for path, layer in _config_chain(Path(config_file).expanduser()):
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as e:
                key, value = (e.full_key, None) if getattr(e, "full_key", None) else _not_a_mapping(layer, Config)
                what = _plain(e) if value is None else f"must be a group of keys, not {value!r}"
                raise ConfigError(f"config key {key!r} in {path}: {what}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. data.category=dog)")
        parts = key.strip().split(".")
        if parts[0] == "stages" and len(parts) >= 2 and parts[1] not in cfg.stages:  # OmegaConf's words are cryptic
            raise ConfigError(f"override {item!r}: the config has no stage {parts[1]!r} (it has "
                              f"{', '.join(cfg.stages)}); a typo? A new stage goes in the YAML file under `stages:`")
        try:
            OmegaConf.update(cfg, key.strip(), _parse_value(value), merge=True)
        except OmegaConfBaseException as e:
            hint = ""
            if value.strip().startswith("[") and re.search(r"[{}:,]", value.strip()[1:-1]):  # YAML reads these
                hint = (""" (braces, colons and commas inside an item are YAML: quote the item, e.g. """
                        """'validation.prompts=["a photo of {}"]')""")
            raise ConfigError(f"override {item!r}: {_plain(e)}{hint}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)} "
                          f"(set them in the YAML or as key=value, e.g. data.category=dog)")
    cfg = OmegaConf.to_object(cfg)
    if str(cfg.runtime.mixed_precision).lower() in ("false", "off", "none"):  # YAML 1.1 reads `no`/`off` as false
        cfg.runtime.mixed_precision = "no"
    cfg.runtime.compile = {"false": "off", "true": "full"}.get(str(cfg.runtime.compile).lower(), cfg.runtime.compile)
    for key, value in (("output_dir", cfg.output_dir), ("data.instance_dir", cfg.data.instance_dir),
                       ("model.pretrained", cfg.model.pretrained)):
        if not value.strip():  # e.g. output_dir=$RUN with RUN unset: would be the current folder
            raise ConfigError(f"config key {key!r}: is empty (an unset shell variable?); give a path")
    cfg.output_dir = os.path.normpath(os.path.expanduser(cfg.output_dir))  # "~/runs/x/" is "/home/me/runs/x"
    cfg.data.instance_dir = os.path.normpath(os.path.expanduser(cfg.data.instance_dir))
    cfg.model.pretrained = os.path.expanduser(cfg.model.pretrained)
    if cfg.model.single_file_config:
        cfg.model.single_file_config = os.path.expanduser(cfg.model.single_file_config)
    if cfg.runtime.memory in MEMORY_PRESETS:  # a switch set explicitly wins over its preset
        for key, value in MEMORY_PRESETS[cfg.runtime.memory].items():
            if getattr(cfg.runtime, key) is None:
                setattr(cfg.runtime, key, value)
        for stage in cfg.stages.values():  # a rank left unset is full weights; only a card preset may choose one
            stage.lora_rank = stage.lora_rank or 0
    if check:
        validate(cfg, card_pending=cfg.runtime.memory in CARD_PRESETS)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
