"""What a checkpoint saves and restores, in one object (as lingua's TrainState): the position in the
plan, the trained tensors, the running stage's optimizer, every process's latent batches, torch's RNG."""
import logging

import torch

from attndreambooth.trainer.checkpoint import flatten_optimizer, unflatten_optimizer
from attndreambooth.trainer.models import restore_weights, trained_weights

log = logging.getLogger(__name__)


class RunState:
    def __init__(self, models, batches, plan):
        self.models, self.batches, self.plan = models, batches, plan
        self.stage, self.step, self.done, self.global_step = None, 0, False, 0
        self.optimizer = None  # the running stage's, set by train_stage
        self.optimizer_state = None  # restored, waiting for the stage's optimizer

    def finished(self, name):
        """True if stage `name` needs no more steps."""
        if self.stage is None:
            return False
        names = self.plan.names
        return names.index(name) < names.index(self.stage) or (name == self.stage and self.done)

    def start_step(self, name):
        return self.step if name == self.stage and not self.done else 0

    def begin(self, name, optimizer):
        """Stage `name` starts (or continues) with `optimizer`; returns the step it starts from. A restored
        optimizer state goes into it when the stage continues where a checkpoint left it."""
        start = self.start_step(name)
        if start and self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        self.stage, self.step, self.done, self.optimizer, self.optimizer_state = name, start, False, optimizer, None
        return start

    def advance(self):
        """One step of the running stage done."""
        self.step, self.global_step = self.step + 1, self.global_step + 1

    def end(self):
        """The running stage is done; its optimizer is not checkpointed any more."""
        self.done, self.optimizer = True, None

    def state_dict(self, stream_states):
        """(tensors, meta); `stream_states` is every process's `batches.state_dict()` (its data stream), in rank
        order. The tensor names ("sampler.<rank>") are the checkpoint format, kept so old runs resume."""
        weights = trained_weights(self.plan[self.stage].holds, self.models)
        tensors = {f"weights.{n}": p for n, p in weights.items()}
        meta = dict(stage=self.stage, step=self.step, done=self.done, global_step=self.global_step, optimizer=None,
                    orders=[s["order"] for s in stream_states], prior_orders=[s.get("prior_order") for s in stream_states])
        if self.optimizer is not None and not self.done:
            optim_tensors, meta["optimizer"] = flatten_optimizer(self.optimizer.state_dict())
            tensors.update(optim_tensors)
        tensors.update({f"sampler.{rank}": s["generator"] for rank, s in enumerate(stream_states)})
        tensors.update({f"sampler_device.{rank}": s["device_generator"] for rank, s in enumerate(stream_states)
                        if "device_generator" in s})
        tensors["rng.torch"] = torch.get_rng_state()
        return tensors, meta

    def load_state_dict(self, tensors, meta, rank=0):
        restore_weights({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}, self.models)
        stream = {"generator": tensors[f"sampler.{rank}"], "order": meta["orders"][rank],
                   "prior_order": (meta.get("prior_orders") or [None] * (rank + 1))[rank]}
        if f"sampler_device.{rank}" in tensors:
            stream["device_generator"] = tensors[f"sampler_device.{rank}"]
        elif self.batches.device_gen is not self.batches.gen:  # written on a CPU, or before draws moved to the GPU
            self.batches.device_gen.manual_seed(int(torch.randint(2**62, (1,), generator=self.batches.gen)))
            log.warning("the checkpoint holds no device generator (written on a CPU, or by a version that drew the "
                        "batch on the host): the device generator is seeded from the run's own, so the run goes on, "
                        "but not bit for bit as an uninterrupted one would")
        self.batches.load_state_dict(stream)
        torch.set_rng_state(tensors["rng.torch"])
        self.stage, self.step, self.done, self.global_step = meta["stage"], meta["step"], meta["done"], meta["global_step"]
        self.optimizer_state = unflatten_optimizer(tensors, meta["optimizer"]) if meta["optimizer"] else None
