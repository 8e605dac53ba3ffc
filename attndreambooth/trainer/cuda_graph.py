"""Experimental, off by default (`runtime.cuda_graph`), and never yet run on a GPU: the method's `Step`
(trainer/method.py) recorded as one CUDA graph, without changing the step. ("Capture" elsewhere in the
trainer means recording attention maps; here the graph is recorded.)

Following PyTorch's and NVIDIA's CUDA-graph guides: warm-up steps on a side stream, then one capture of
forward + Eq. 2 + backward + AdamW (capturable, its lr a device tensor), gradients set to None before the
capture so the graph's backward writes them in its own pool, the device generator registered with the graph
(the draws are inside it), autocast without its weight cache (a cached cast would be a tensor from outside the
graph). What changes between replays is copied into a static buffer: the host's image order for the step.
On a CPU the same queued step runs uncaptured and gives the loop's weights bit for bit (tests/test_compile.py).
"""
import torch

from attndreambooth.config.plan import DTYPES


class GraphedStep:
    """A `Step` as one CUDA graph: the first `warmup` calls run it on a side stream (real steps, counted), the
    next captures it and replays the capture, and every later call is a replay. The host's part of a step (the
    image order) runs before each replay and lands in the data stream's queued-images buffer."""

    def __init__(self, step, warmup=3, capture=True):
        """`capture=False` runs the same queued step uncaptured every time (a CPU: what its test checks)."""
        self.step, self.warmup, self.capture, self.calls, self.graph, self.out = step, warmup, capture, 0, None, None
        step.images_queued = True

    def __call__(self, point=None):
        self.calls += 1
        self.step.batches.queue(self.step.per_process)  # host work, before the device's part
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
                register(self.step.batches.device_gen)
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


def graph_autocast(cfg, device):
    """Autocast without its weight cache: a cached cast is a tensor made outside the graph."""
    dtype = DTYPES.get(cfg.runtime.mixed_precision, torch.float32)
    return lambda: torch.autocast(device.type, dtype, enabled=cfg.runtime.mixed_precision != "no",
                                  cache_enabled=False)
