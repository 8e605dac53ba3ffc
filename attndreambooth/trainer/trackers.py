"""Experiment trackers (`runtime.report_to`): accelerate's, with the run's config as hyper-parameters, the
step terms as scalars (reporting.Reporter) and the validation grids as images. `runtime.tensorboard=false`
is the older way to leave TensorBoard out, and still works."""
import importlib.util
import logging

import numpy as np

log = logging.getLogger(__name__)


def trackers_in_use(cfg):
    """The trackers this run reports to: runtime.report_to, without TensorBoard when runtime.tensorboard is
    false or it is not installed (the default list must not stop a run; config.checks refused the others)."""
    names = [n for n in dict.fromkeys(cfg.runtime.report_to) if n != "tensorboard" or cfg.runtime.tensorboard]
    if "tensorboard" in cfg.runtime.report_to and not cfg.runtime.tensorboard:
        log.info("runtime.tensorboard=false: TensorBoard is left out of runtime.report_to (no TensorBoard logs)")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        log.info("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        names.remove("tensorboard")
    return names


def log_with(names, out):
    """accelerate's `log_with`: TensorBoard as an instance writing to RUN/tensorboard (where it always wrote; by
    name it would write to RUN/<project>), the others by name under the project "attndreambooth"."""
    from accelerate.tracking import TensorBoardTracker
    return [TensorBoardTracker("tensorboard", str(out)) if n == "tensorboard" else n for n in names] or None


def start_trackers(accelerator, names, config, run_name):
    """accelerate's init_trackers, before any weights load; a tracker that cannot start where it is set up
    (mlflow's tracking URI, wandb's login, a server it cannot reach) is one line naming it, not a traceback."""
    from attndreambooth.config.schema import ConfigError
    try:
        accelerator.init_trackers("attndreambooth", config=config,
                                  init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}})
    except Exception as e:  # each library raises its own kinds
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"config key 'runtime.report_to': {', '.join(names)} could not start: {first}") from None
    log.info("reporting to %s", ", ".join(names))


def hyperparameters(record, prefix=""):
    """The config as flat `section.key` scalars (lists as text): what every tracker takes as hyper-parameters."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_grid(accelerator, names, tag, grid, step):
    """A validation grid (PIL) to every tracker that takes images."""
    for name in names:
        tracker = accelerator.get_tracker(name, unwrap=False)
        if name == "tensorboard":
            tracker.log_images({tag: np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [grid]}, step=step)
