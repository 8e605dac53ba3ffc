"""Where a step's numbers go: held on the device until one read (`UnreadTerms`), checked for a non-finite loss
on every process, then written to metrics.jsonl, the log and the trackers (`Reporter`)."""
import json
import logging

import torch

log = logging.getLogger(__name__)

TERMS = ("loss", "mse", "reg", "reg_mean", "reg_var", "prior")  # a step's terms; prior: the class images' MSE (or 0)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops, its last checkpoint stays."""


class Reporter:
    """A step's record to metrics.jsonl, the log (every `runtime.log_every_steps`) and the trackers; validation
    grids at their cadence."""

    def __init__(self, out, accelerator, cfg, validate=None):
        self.accelerator, self.cfg, self.validate, self.global_step = accelerator, cfg, validate, 0
        self.metrics = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None

    def step(self, record, steps):
        self.global_step += 1
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        name, step = record["stage"], record["step"]
        if step % self.cfg.runtime.log_every_steps == 0 or step == steps:
            prior = f" prior {record['prior']:.5f}" if self.cfg.prior.enabled and record["prior"] else ""
            log.info("%s step %d/%d loss %.5f mse %.5f%s reg %.3e (mean %.3e var %.3e)", name, step, steps,
                     record["loss"], record["mse"], prior, record["reg"], record["reg_mean"], record["reg_var"])
        self.accelerator.log({f"{name}/{k}": record[k] for k in (*TERMS, "lr")}, step=self.global_step)
        every = self.cfg.validation.every_steps
        if self.validate is not None and every > 0 and (step % every == 0 or step == steps):
            self.validate(name, step, self.global_step)

    def close(self):
        if self.metrics is not None:
            self.metrics.close()


class UnreadTerms:
    """A stage's step terms still on the device: `flush` reads them all back at once (the one host
    synchronisation), checks them on every process, and hands each step's record to the Reporter."""

    def __init__(self, name, stage, accelerator, reporter, bar):
        self.name, self.stage, self.accelerator, self.reporter, self.bar = name, stage, accelerator, reporter, bar
        self.steps, self.values, self.seconds = [], [], []

    def add(self, step, values, seconds):
        self.steps.append(step), self.values.append(values), self.seconds.append(seconds)

    def flush(self):
        if not self.steps:
            return
        values = torch.stack(self.values)
        finite = torch.isfinite(values[:, 0])
        if not self.accelerator.gather(finite.all().reshape(1)).all():  # all ranks stop together, at one step
            every = self.accelerator.gather(values[None]).cpu()  # (processes, steps, terms)
            bad = torch.nonzero(~torch.isfinite(every[..., 0]))
            rank, index = min(bad.tolist(), key=lambda ri: (ri[1], ri[0]))  # the first step that failed anywhere
            mse, reg = every[rank, index, 1].item(), every[rank, index, 2].item()
            raise NonFiniteLoss(
                f"{self.name} step {self.steps[index]}: the loss is not finite (mse {mse:.4g}, reg {reg:.4g}). "
                f"Nothing after the last checkpoint is kept. Run the same command again to resume from it, e.g. "
                f"with a lower learning rate (stages.{self.name}.lr={self.stage.lr / 2:g}) or runtime.max_grad_norm=1.0")
        for step, row, seconds in zip(self.steps, values.cpu().tolist(), self.seconds):
            record = dict(stage=self.name, step=step, **dict(zip(TERMS, row)), lr=self.stage.lr, seconds=seconds)
            self.reporter.step(record, self.stage.steps)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", reg=f"{record['reg']:.2e}")
        self.steps, self.values, self.seconds = [], [], []


def peak_memory_gib(device):
    """Peak GPU memory since the last reset, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
