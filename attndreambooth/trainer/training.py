"""The training objective and one stage of training: a stage is data plus `run_stage`."""
import json
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from attention_reg import attention_reg_loss
from attndreambooth.config.plan import DTYPES
from attndreambooth.trainer.parts import trainable_parameters
from attndreambooth.trainer.prior import uses_prior
from attndreambooth.trainer.step import TERMS, GraphedStep, StepFunction, capturable_optimizer

log = logging.getLogger(__name__)


class AttnDreamBoothLoss(nn.Module):
    """The loss that is optimised, diffusion MSE + Eq. 2, for one batch; holds every model that a stage may
    train, so that accelerate/DDP wraps (and all-reduces) whatever a stage trains, the [V] row(s) included."""

    TERMS = TERMS  # what `forward` returns, by name

    def __init__(self, family, unet, text_encoders, noise_scheduler, capture, reduction):
        super().__init__()
        self.family, self.unet, self.text_encoders = family, unet, nn.ModuleList(text_encoders)
        self.noise_scheduler, self.capture, self.reduction = noise_scheduler, capture, reduction

    def encode(self, input_ids):
        """The prompt's conditioning (families.Conditioning) from its token ids, one tensor per tokenizer."""
        return self.family.encode(list(self.text_encoders), input_ids)

    def forward(self, latents, noise, timesteps, input_ids=None, cond=None, mean_weight=0.0, var_weight=0.0,
                view_geometry=None, prior=None, prior_weight=0.0):
        """Returns {term: value} for TERMS: loss = mse + reg (+ prior_weight * prior), reg = Eq. 2 with the given
        weights. `cond` is the cached conditioning (see `encode`), else the text encoder(s) run once on
        `input_ids` and it is broadcast over the batch; a family whose denoiser takes each view's size and crop
        (SDXL) gets `view_geometry` (B, 6). `prior` (StepFunction.prior_batch): the class images' latents, noise,
        timesteps, geometry and conditioning, denoised in the same U-Net call; Eq. 2 reads only the instance half."""
        if cond is None:
            cond = self.encode(input_ids)
        n, cond = latents.shape[0], cond.expand(latents.shape[0])
        if prior is not None:
            p_latents, p_noise, p_timesteps, p_geometry, p_cond = prior
            latents, noise, timesteps = torch.cat([latents, p_latents]), torch.cat([noise, p_noise]), torch.cat(
                [timesteps, p_timesteps])
            cond = cond.cat(p_cond.expand(p_latents.shape[0]))
            view_geometry = None if view_geometry is None else torch.cat([view_geometry, p_geometry])
        inputs = self.family.denoiser_inputs(cond, view_geometry)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.family.training_target(self.noise_scheduler, latents, noise, timesteps)
        if self.capture is not None:
            self.capture.clear()
        pred = self.unet(noisy, timesteps, **inputs).sample.float()
        mse, zero = F.mse_loss(pred[:n], target[:n].float()), pred.new_zeros(())
        prior_mse = zero if prior is None else F.mse_loss(pred[n:], target[n:].float())
        loss = mse + prior_weight * prior_mse if prior is not None else mse
        if self.capture is None:  # regulariser off
            return dict(loss=loss, mse=mse, reg=zero, reg_mean=zero, reg_var=zero, prior=prior_mse)
        maps = self.capture.maps if prior is None else [m[:n] for m in self.capture.maps]
        reg, mean_term, var_term = attention_reg_loss(maps, mean_weight, var_weight, self.reduction, with_terms=True)
        return dict(loss=loss + reg, mse=mse, reg=reg, reg_mean=mean_term, reg_var=var_term, prior=prior_mse)


class Hooks:
    """Where tests step into a run (kill the process at a point, make a loss NaN); production passes none."""

    def at(self, point):
        """Called at named points: "<stage>:<step>" after each step, "<stage>:end", "checkpoint", "finished"."""

    def loss(self, point, loss):
        return loss


@dataclass
class Models:
    """Everything a stage needs that stays across stages."""
    family: object  # families.Family: asked for everything the model family decides
    unet: nn.Module
    text_encoders: list  # in the family's conditioning order; [V] has a row in each
    noise_scheduler: object
    capture: object
    input_ids: list  # the training prompt's token ids (1, 77), one tensor per tokenizer
    cond: object = None  # the cached conditioning once [V] is frozen (families.Conditioning)
    cache_text: bool = True  # False: run the text encoder every step (the released code; for benchmarks)
    prior_cond: object = None  # the class prompt's conditioning, with prior preservation (trainer/prior.py)


def set_trainable(planned, models):
    """Freeze everything, then unfreeze the parts the planned stage names (its adapter for a LoRA stage);
    returns the trainable parameters."""
    for model in (models.unet, *models.text_encoders):
        model.requires_grad_(False)
    params = trained_weights(planned.config.train, models, adapter=planned.name if planned.lora else None)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


class Reporter:
    """Where a step's numbers go (metrics.jsonl, the log, TensorBoard) and when validation grids are made."""

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
        self.accelerator.log({f"{name}/{k}": record[k] for k in (*AttnDreamBoothLoss.TERMS, "lr")},
                             step=self.global_step)
        every = self.cfg.validation.every_steps
        if self.validate is not None and every > 0 and (step % every == 0 or step == steps):
            self.validate(name, step, self.global_step)

    def close(self):
        if self.metrics is not None:
            self.metrics.close()


def make_optimizer(params, stage, runtime, device):
    """AdamW at the stage's constant lr: fused kernel, or 8-bit (bitsandbytes) in the low-memory preset."""
    if runtime.optimizer_8bit:
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=stage.lr, weight_decay=stage.weight_decay)
    fused = runtime.fused_adamw and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, fused=fused or None)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops, its last checkpoint stays."""


def trained_weights(parts, models, adapter=None):
    """The parameters of `parts` by name (names as in `trainable_parameters`, also checkpoint keys)."""
    return {n: p for part in parts
            for n, p in trainable_parameters(part, models.unet, models.text_encoders, models.family, adapter).items()}


@torch.no_grad()
def restore_weights(weights, models):
    """Copy checkpointed tensors back into the models."""
    params = trained_weights(("embedding", "unet", "lora"), models)
    for name, value in weights.items():
        params[name].copy_(value)


def run_stage(planned, models, sampler, accelerator, cfg, reporter, state=None, checkpoint=None, hooks=None):
    """Train a planned stage (config.plan.PlannedStage): `steps` AdamW steps of what its `train` names (constant
    lr, uniform timesteps). With a RunState `state`, continue from its position and optimizer state and keep
    it current; `checkpoint(state)` is called every `runtime.checkpoint_every_steps` steps. A step reads
    nothing back from the device: its terms wait on the device until a read (`Pending.flush`) every
    `runtime.log_every_steps` steps and before every checkpoint, validation grid and the stage's end, which
    stops the run at the first non-finite loss before anything holds its weights."""
    hooks, name, stage = hooks or Hooks(), planned.name, planned.config
    params = set_trainable(planned, models)
    per_process, rest = divmod(stage.batch_size, accelerator.num_processes)
    if rest:
        raise ValueError(f"stages.{name}.batch_size={stage.batch_size} does not split over "
                         f"{accelerator.num_processes} processes")
    run_text = "embedding" in stage.train or not models.cache_text
    objective = AttnDreamBoothLoss(models.family, models.unet, models.text_encoders, models.noise_scheduler,
                                   models.capture, cfg.reg.reduction)
    if not run_text:  # computed anew for every stage: an earlier stage may have moved [V]
        with torch.no_grad(), accelerator.autocast():
            models.cond = objective.encode(models.input_ids).float()
    device, graphed = accelerator.device, cfg.runtime.cuda_graph
    optimizer = capturable_optimizer(params, stage, device) if graphed else make_optimizer(params, stage, cfg.runtime,
                                                                                           device)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    start_step = 0 if state is None else state.begin(name, optimizer)
    # per_layer sums Eq. 2 over the batch; DDP averages over processes, so scale to the global batch's sum.
    batch_sum = accelerator.num_processes if cfg.reg.reduction == "per_layer" else 1
    weights = dict(mean_weight=batch_sum * stage.reg_mean_weight, var_weight=batch_sum * stage.reg_var_weight,
                   prior_weight=cfg.prior.weight if uses_prior(cfg, stage) else 0.0)
    autocast = None
    if graphed:  # a cached cast is a tensor made outside the graph
        autocast = lambda: torch.autocast(device.type, DTYPES.get(cfg.runtime.mixed_precision, torch.float32),  # noqa: E731
                                          enabled=cfg.runtime.mixed_precision != "no", cache_enabled=False)
    step_fn = StepFunction(objective, optimizer, params, sampler, models, accelerator, cfg, per_process, weights,
                           run_text, hooks, autocast)
    step_fn = GraphedStep(step_fn, capture=device.type == "cuda") if graphed else step_fn
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(range(start_step, stage.steps), desc=f"{name} ({'+'.join(stage.train)})", initial=start_step,
               total=stage.steps, disable=not accelerator.is_main_process)
    every, validate_every = cfg.runtime.checkpoint_every_steps, cfg.validation.every_steps
    pending = Pending(name, stage, accelerator, reporter, bar)
    start = time.perf_counter()
    models.unet.train()  # validation switches to eval and back
    for step in bar:
        pending.add(step + 1, step_fn(f"{name}:{step + 1}"), round(time.perf_counter() - start, 5))
        if state is not None:
            state.advance()
        checkpoint_now = checkpoint is not None and every > 0 and (step + 1) % every == 0 and step + 1 < stage.steps
        if (checkpoint_now or (step + 1) % cfg.runtime.log_every_steps == 0 or step + 1 == stage.steps
                or (validate_every > 0 and (step + 1) % validate_every == 0)):
            pending.flush()  # raises on a non-finite loss: nothing after the last checkpoint is kept
        if checkpoint_now:
            checkpoint(state)
        hooks.at(f"{name}:{step + 1}")
    pending.flush()
    if models.capture is not None:
        models.capture.clear()
    if state is not None:
        state.end()
    accelerator.free_memory()  # drop the stage's wrappers and optimizer state
    for p in params:
        p.requires_grad_(False)
    return time.perf_counter() - start, peak_memory_gib(device)


class Pending:
    """A stage's step terms waiting on the device: `flush` reads them all back at once (the one host
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
