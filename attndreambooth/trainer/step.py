"""One training step with no host work, and the same step captured as one CUDA graph (`runtime.cuda_graph`).

`StepFunction` is the whole step: draw the batch (latents, noise, timesteps on the device), the loss (MSE +
Eq. 2), backward, clipping, the optimizer step; it returns the loss terms as one device tensor and never reads
a value back. The loop calls it as it is; `GraphedStep` captures it, following the requirements of PyTorch's
and NVIDIA's CUDA-graph guides: warm-up steps on a side stream, then one capture of forward + Eq. 2 +
backward + AdamW (capturable, its lr a device tensor), gradients set to None before the capture so the
graph's backward writes them in its own pool, the device generator registered with the graph (the draws
are inside it), autocast without its weight cache (a cached cast would be a tensor from outside the graph).
What changes between replays is copied into static buffers: the host's image order for the step.

The capture itself has not run on a GPU yet (this was built and tested on a CPU, where the step runs
uncaptured and gives the loop's weights bit for bit); a GPU session measures it.
"""
import torch

from attndreambooth.trainer.data import draw_noise

TERMS = ("loss", "mse", "reg", "reg_mean", "reg_var", "prior")  # prior: the class images' MSE (or 0)


class StepFunction:
    """The step of a stage: `__call__(point)` trains one step and returns its TERMS as a (6,) float tensor on
    the device (`point` names the step for the test hooks)."""

    def __init__(self, objective, optimizer, params, sampler, models, accelerator, cfg, per_process, weights,
                 run_text, hooks, autocast=None):
        self.objective, self.optimizer, self.params, self.sampler = objective, optimizer, params, sampler
        self.models, self.accelerator, self.cfg, self.per_process = models, accelerator, cfg, per_process
        self.weights, self.run_text, self.hooks = weights, run_text, hooks
        self.autocast = autocast or accelerator.autocast
        self.T = models.noise_scheduler.config.num_train_timesteps
        self.staged = False  # GraphedStep: the sampler's images are staged by the host before each replay

    def batch(self, sampler=None, staged=None):
        """Latents, noise, timesteps and (SDXL) the views' geometry from `sampler` (default the instance one),
        all drawn on the device."""
        sampler, staged = sampler or self.sampler, self.staged if staged is None else staged
        geometry, kwargs = None, dict(staged=True) if staged else {}
        if self.models.family.needs_view_geometry:  # e.g. SDXL: each sampled view's size and crop conditioning
            latents, geometry = sampler.sample(self.per_process, with_geometry=True, **kwargs)
        else:
            latents = sampler.sample(self.per_process, **kwargs)
        noise, timesteps = draw_noise(sampler, latents, self.T)
        return latents.to(self.accelerator.device), noise, timesteps, geometry

    def prior_batch(self):
        """Prior preservation's batch (trainer/prior.py): as many class latents, their noise, timesteps, geometry
        and the class prompt's conditioning; None in a stage without it."""
        if not self.weights.get("prior_weight"):
            return None
        return (*self.batch(self.sampler.prior, staged=False), self.models.prior_cond)

    def __call__(self, point=None):
        latents, noise, timesteps, geometry = self.batch()
        prior = self.prior_batch()
        with self.autocast():
            terms = self.objective(latents, noise, timesteps, input_ids=self.models.input_ids,
                                   cond=None if self.run_text else self.models.cond, view_geometry=geometry,
                                   prior=prior, **self.weights)
        if point is not None:
            terms["loss"] = self.hooks.loss(point, terms["loss"])
        self.accelerator.backward(terms["loss"])
        if self.cfg.runtime.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.runtime.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([terms[k] for k in TERMS]).detach().float()


class GraphedStep:
    """`StepFunction` as one CUDA graph: the first `warmup` calls run it on a side stream (real steps, counted),
    the next captures it and replays the capture, and every later call is a replay. The host's part of a step
    (the image order) runs before each replay and lands in the sampler's static index buffer."""

    def __init__(self, step, warmup=3, capture=True):
        """`capture=False` runs the same staged step uncaptured every time (a CPU: what its test checks)."""
        self.step, self.warmup, self.capture, self.calls, self.graph, self.out = step, warmup, capture, 0, None, None
        step.staged = True

    def __call__(self, point=None):
        self.calls += 1
        self.step.sampler.stage(self.step.per_process)  # host work, before the device's part
        if not self.capture:
            return self.step(point)
        if self.calls <= self.warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.step(point)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            register = getattr(self.graph, "register_generator_state", None)
            if register is not None:  # the draws inside the graph advance the device generator on each replay
                register(self.step.sampler.device_gen)
            self.step.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.out = self.step(point)
        self.graph.replay()
        return self.out.clone()


def capturable_optimizer(params, stage, device):
    """AdamW whose step is capturable: fused, capturable, the lr a tensor on the device (a Python float would
    be baked into the graph as a constant). float64, as the float the loop's AdamW uses: the same updates bit
    for bit (a float32 lr rounds 1e-3 and moves weights by ~3e-8 in five steps)."""
    return torch.optim.AdamW(params, lr=torch.tensor(stage.lr, dtype=torch.float64, device=device),
                             weight_decay=stage.weight_decay, fused=True, capturable=True)
