"""The method: AttnDreamBooth's loss and one stage of its training, read top to bottom.

Pang et al., "AttnDreamBooth: Towards Text-Aligned Personalized Text-to-Image Generation", NeurIPS 2024
(arXiv 2406.05000); docs/method.md states the method as implemented. A run is three stages of one loop; each
stage trains other parameters of the same loss (the config's `stages.*`, defaults from the paper):

    stage   trains                                   steps  lr     batch  Eq. 2 weights mean / var
    stage1  [V]'s input embedding row                60     1e-3   8      0.1 / 0
    stage2  the cross-attention layers (attn2)       100    2e-5   8      2 / 5
    stage3  the whole denoiser                       500    2e-6   8      2 / 5

One step (`Step.__call__`): draw the batch (latents of augmented views of the photos) -> noise and timesteps
-> the family's noisy input and target -> the denoiser, its cross-attention maps captured -> diffusion MSE +
Eq. 2 on [V]'s and the category token's maps (+ prior preservation's MSE, off by default) -> backward ->
gradient clipping -> AdamW step. A step reads nothing back from the device; `train_stage` reads the terms
every `runtime.log_every_steps` steps and before anything that keeps weights, and stops at a non-finite loss.

Everything model-specific is asked of the family (attndreambooth/families): the conditioning, the noisy input
and target, the denoiser call, which layers are captured. The harness around a stage (run folder, checkpoints,
trackers, validation, the final save) is trainer/run.py.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from attention_reg import attention_reg_loss
from attndreambooth.trainer.data import draw_noise
from attndreambooth.trainer.models import set_trainable
from attndreambooth.trainer.prior import uses_prior
from attndreambooth.trainer.reporting import TERMS, UnreadTerms, peak_memory_gib
from attndreambooth.trainer.signals import SIGTERM_STOP, Stopped


class AttnDreamBoothLoss(nn.Module):
    """Diffusion MSE + Eq. 2 for one batch. A module holding every model a stage may train, so that
    accelerate/DDP wraps (and all-reduces) whatever a stage trains, the [V] row(s) included."""

    def __init__(self, family, unet, text_encoders, noise_scheduler, capture, reduction):
        super().__init__()
        self.family, self.unet, self.text_encoders = family, unet, nn.ModuleList(text_encoders)
        self.noise_scheduler, self.capture, self.reduction = noise_scheduler, capture, reduction

    def encode(self, input_ids):
        """The prompt's conditioning (families.Conditioning) from its token ids, one tensor per tokenizer."""
        return self.family.encode(list(self.text_encoders), input_ids)

    def forward(self, latents, noise, timesteps, input_ids=None, cond=None, mean_weight=0.0, var_weight=0.0,
                view_geometry=None, prior=None, prior_weight=0.0):
        """{term: value} for TERMS: loss = mse + reg (+ prior_weight * prior), reg = Eq. 2 with the given
        weights. `cond`: the cached conditioning, else the text encoder(s) run on `input_ids` (the one prompt,
        broadcast over the batch). `view_geometry` (B, 6): each view's size and crop, for a family whose
        denoiser takes them (SDXL). `prior` (Step.prior_batch): the class images' latents, noise, timesteps,
        geometry and conditioning, denoised in the same call; Eq. 2 reads only the instance half."""
        if cond is None:
            cond = self.encode(input_ids)
        n, cond = latents.shape[0], cond.expand(latents.shape[0])
        if prior is not None:
            p_latents, p_noise, p_timesteps, p_geometry, p_cond = prior
            latents, noise, timesteps = torch.cat([latents, p_latents]), torch.cat([noise, p_noise]), torch.cat(
                [timesteps, p_timesteps])
            cond = cond.cat(p_cond.expand(p_latents.shape[0]))
            view_geometry = None if view_geometry is None else torch.cat([view_geometry, p_geometry])
        noisy, target = self.family.noised(self.noise_scheduler, latents, noise, timesteps)
        if self.capture is not None:
            self.capture.clear()  # the maps of this call only
        pred = self.family.predict(self.unet, noisy, timesteps, cond, view_geometry).float()
        mse, zero = F.mse_loss(pred[:n], target[:n].float()), pred.new_zeros(())
        prior_mse = zero if prior is None else F.mse_loss(pred[n:], target[n:].float())
        loss = mse + prior_weight * prior_mse if prior is not None else mse
        if self.capture is None:  # regulariser off
            return dict(loss=loss, mse=mse, reg=zero, reg_mean=zero, reg_var=zero, prior=prior_mse)
        maps = self.capture.maps if prior is None else [m[:n] for m in self.capture.maps]
        reg, mean_term, var_term = attention_reg_loss(maps, mean_weight, var_weight, self.reduction, with_terms=True)
        return dict(loss=loss + reg, mse=mse, reg=reg, reg_mean=mean_term, reg_var=var_term, prior=prior_mse)


class FaultInjection:
    """Where tests step into a run: kill the process at a named point, make a loss NaN. A real run uses this
    class as it is, which does nothing."""

    def at(self, point):
        """Called at named points: "<stage>:<step>" after each step, "<stage>:end", "checkpoint", "finished"."""

    def loss(self, point, loss):
        return loss


class Step:
    """One training step of a stage: `step(point)` trains one step and returns its TERMS as a (6,) float
    tensor on the device (`point` names the step for FaultInjection)."""

    def __init__(self, objective, optimizer, params, batches, models, accelerator, cfg, per_process, weights,
                 run_text, faults, autocast=None):
        self.objective, self.optimizer, self.params, self.batches = objective, optimizer, params, batches
        self.models, self.accelerator, self.cfg, self.per_process = models, accelerator, cfg, per_process
        self.weights, self.run_text, self.faults = weights, run_text, faults
        self.autocast = autocast or accelerator.autocast
        self.images_queued = False  # trainer/cuda_graph.py queues each step's images before a replay

    def batch(self, batches=None, queued=None):
        """Latents, noise, timesteps and (SDXL) the views' geometry from `batches` (default the instance
        photos'), all drawn on the device."""
        batches, queued = batches or self.batches, self.images_queued if queued is None else queued
        geometry, kwargs = None, dict(queued=True) if queued else {}
        if self.models.family.needs_view_geometry:
            latents, geometry = batches.sample(self.per_process, with_geometry=True, **kwargs)
        else:
            latents = batches.sample(self.per_process, **kwargs)
        noise, timesteps = draw_noise(batches, latents, self.models.family, self.models.noise_scheduler)
        return latents.to(self.accelerator.device), noise, timesteps, geometry

    def prior_batch(self):
        """Prior preservation's batch (trainer/prior.py): as many class latents, their noise, timesteps, geometry
        and the class prompt's conditioning; None in a stage without it."""
        if not self.weights.get("prior_weight"):
            return None
        return (*self.batch(self.batches.prior, queued=False), self.models.prior_cond)

    def __call__(self, point=None):
        latents, noise, timesteps, geometry = self.batch()
        prior = self.prior_batch()
        with self.autocast():
            terms = self.objective(latents, noise, timesteps, input_ids=self.models.input_ids,
                                   cond=None if self.run_text else self.models.cond, view_geometry=geometry,
                                   prior=prior, **self.weights)
        if point is not None:
            terms["loss"] = self.faults.loss(point, terms["loss"])
        self.accelerator.backward(terms["loss"])
        if self.cfg.runtime.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.runtime.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([terms[k] for k in TERMS]).detach().float()


def make_optimizer(params, stage, runtime, device):
    """AdamW at the stage's constant lr (the paper's): fused kernel, or 8-bit (bitsandbytes) in the low-memory
    preset."""
    if runtime.optimizer_8bit:
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=stage.lr, weight_decay=stage.weight_decay)
    fused = runtime.fused_adamw and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, fused=fused or None)


def train_stage(planned, models, batches, accelerator, cfg, reporter, state=None, checkpoint=None, faults=None):
    """Train a planned stage (config.plan.PlannedStage): `steps` AdamW steps of what its `train` names. With a
    RunState `state`, continue from its position and optimizer state and keep it current; `checkpoint(state)`
    is called every `runtime.checkpoint_every_steps` steps. Returns (seconds, peak memory in GiB)."""
    faults, name, stage = faults or FaultInjection(), planned.name, planned.config
    params = set_trainable(planned, models)
    per_process, rest = divmod(stage.batch_size, accelerator.num_processes)
    if rest:
        raise ValueError(f"stages.{name}.batch_size={stage.batch_size} does not split over "
                         f"{accelerator.num_processes} processes")
    run_text = "embedding" in stage.train or not models.cache_text
    objective = AttnDreamBoothLoss(models.family, models.unet, models.text_encoders, models.noise_scheduler,
                                   models.capture, cfg.reg.reduction)
    if not run_text:  # computed anew for every stage: an earlier stage may have moved [V]
        for encoder in models.text_encoders:
            encoder.to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            models.cond = objective.encode(models.input_ids).float()
    for encoder in models.text_encoders:  # off the device while only the cached conditioning is used (T5: 4.7 B)
        encoder.to(accelerator.device if run_text else "cpu")
    device, graphed = accelerator.device, cfg.runtime.cuda_graph
    if graphed:
        from attndreambooth.trainer.cuda_graph import capturable_optimizer, graph_autocast
        optimizer = capturable_optimizer(params, stage, device)
    else:
        optimizer = make_optimizer(params, stage, cfg.runtime, device)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    start_step = 0 if state is None else state.begin(name, optimizer)
    # per_layer sums Eq. 2 over the batch; DDP averages over processes, so scale to the global batch's sum.
    batch_sum = accelerator.num_processes if cfg.reg.reduction == "per_layer" else 1
    weights = dict(mean_weight=batch_sum * stage.reg_mean_weight, var_weight=batch_sum * stage.reg_var_weight,
                   prior_weight=cfg.prior.weight if uses_prior(cfg, stage) else 0.0)
    step = Step(objective, optimizer, params, batches, models, accelerator, cfg, per_process, weights, run_text,
                faults, graph_autocast(cfg, device) if graphed else None)
    if graphed:
        from attndreambooth.trainer.cuda_graph import GraphedStep
        step = GraphedStep(step, capture=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(range(start_step, stage.steps), desc=f"{name} ({'+'.join(stage.train)})", initial=start_step,
               total=stage.steps, disable=not accelerator.is_main_process)
    every, validate_every = cfg.runtime.checkpoint_every_steps, cfg.validation.every_steps
    unread = UnreadTerms(name, stage, accelerator, reporter, bar)
    start = time.perf_counter()
    models.unet.train()  # validation switches to eval and back
    SIGTERM_STOP.in_steps = True
    for i in bar:
        done = i + 1
        unread.add(done, step(f"{name}:{done}"), round(time.perf_counter() - start, 5))
        if state is not None:
            state.advance()
        checkpoint_now = checkpoint is not None and every > 0 and done % every == 0 and done < stage.steps
        stop_now = SIGTERM_STOP.requested and checkpoint is not None and done < stage.steps
        if (checkpoint_now or stop_now or done % cfg.runtime.log_every_steps == 0 or done == stage.steps
                or (validate_every > 0 and done % validate_every == 0)):
            unread.flush()  # raises on a non-finite loss: nothing after the last checkpoint is kept
        if checkpoint_now or stop_now:
            checkpoint(state)
        if stop_now:
            raise Stopped(f"{name} step {done}")
        faults.at(f"{name}:{done}")
    SIGTERM_STOP.in_steps = False
    unread.flush()
    if models.capture is not None:
        models.capture.clear()
    if state is not None:
        state.end()
    accelerator.free_memory()  # drop the stage's wrappers and optimizer state
    for p in params:
        p.requires_grad_(False)
    return time.perf_counter() - start, peak_memory_gib(device)
