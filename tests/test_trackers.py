"""runtime.report_to with a tracker other than TensorBoard that needs no network: mlflow's file store. The
run's config arrives as hyper-parameters and every step's terms as metrics, equal to metrics.jsonl; a
tracker that cannot start where it is set up is one line before weights load."""
import json

import pytest
import yaml

import train_attndreambooth as T
from attndreambooth.trainer.trackers import hyperparameters
from conftest import ROOT, tiny_overrides

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is in requirements-dev.txt")


def test_mlflow_receives_the_config_and_every_step(tmp_path, monkeypatch):
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database; a file store needs none
    out = T.main(["--config", str(ROOT / "configs/tiny.yaml")] + tiny_overrides(
        tmp_path / "my_run", **{"runtime.report_to": "[mlflow]"}))
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attndreambooth").experiment_id])
    assert run.info.run_name == "my_run" and run.info.status == "FINISHED"
    config = yaml.safe_load((out / "config.yaml").read_text())
    want = {k: str(v) for k, v in hyperparameters(config).items()}  # mlflow keeps parameters as text
    assert run.data.params == want and run.data.params["stages.stage2.steps"] == "3"
    assert run.data.params["runtime.report_to"] == "['mlflow']"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for stage in ("stage1", "stage2", "stage3"):
        for term in ("loss", "reg_mean", "lr"):
            logged = sorted(client.get_metric_history(run.info.run_id, f"{stage}/{term}"), key=lambda m: m.step)
            mine = [(i + 1, s[term]) for i, s in enumerate(steps) if s["stage"] == stage]
            assert [m.step for m in logged] == [i for i, _ in mine]
            assert [m.value for m in logged] == pytest.approx([v for _, v in mine], rel=1e-6)
    assert not (out / "tensorboard").exists()  # report_to replaced the default, it did not add to it


def test_a_tracker_that_cannot_start_is_one_line_before_weights_load(tmp_path, monkeypatch):
    import attndreambooth.trainer.run as R
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://tracking")  # set up wrongly where the run starts
    monkeypatch.setattr(R, "prepare", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny.yaml")] + tiny_overrides(
            tmp_path / "run", **{"runtime.report_to": "[mlflow]"}))
    message = str(e.value.code)
    assert message.startswith("error: config key 'runtime.report_to': mlflow could not start: ") and "\n" not in message


def test_tensorboard_switched_off_inside_report_to_is_said(caplog):
    """runtime.report_to=[tensorboard] with runtime.tensorboard=false gave no TensorBoard and no word why."""
    import logging

    from attndreambooth.config.loading import load_config
    from attndreambooth.trainer.trackers import trackers_in_use
    from conftest import SAMPLE
    cfg = load_config(None, ["output_dir=x", f"data.instance_dir={SAMPLE}", "data.category=toy",
                             "runtime.report_to=[tensorboard]", "runtime.tensorboard=false"])
    with caplog.at_level(logging.INFO):
        assert trackers_in_use(cfg) == []
    assert "runtime.tensorboard=false: TensorBoard is left out of runtime.report_to" in caplog.text
