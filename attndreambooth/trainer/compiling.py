"""torch.compile for the U-Net, three ways (`runtime.compile`), and the cache that keeps what it compiled.

- `off`: eager.
- `regional`: each repeated block compiled on its own (diffusers' `compile_repeated_blocks`: the U-Net's
  `BasicTransformerBlock`s, with the capture processor inside; `regions` may add `ResnetBlock2D`). Blocks of
  one shape share one compiled graph, so SD compiles four graphs (one per resolution level), not sixteen.
- `full`: the whole U-Net as one graph (attention_reg.compile_with_capture).

The cache: inductor's FX-graph and AOTAutograd caches (on by default in torch) under a folder the user keeps
(`runtime.compile_cache`, default ~/.cache/attndreambooth/compile), one subfolder per torch version and
device, so a second process, stage or run reuses what an earlier one compiled; torch's own cache keys hold
the graph, its shapes and the compiler's configuration, so a different layout never reuses an entry.
"""
import os
from pathlib import Path

import torch

from attndreambooth.config.schema import COMPILE_MODES

REGIONS = ("BasicTransformerBlock",)
RECOMPILE_LIMIT = 64  # block shapes x stages, with room for SDXL's and a config's extra stages  # what `regional` compiles; the ResNet blocks are measured in benchmark.py


def cache_folder(base, device):
    """The subfolder of `base` for this torch and device (e.g. 2.13.0+cpu/cpu, or .../NVIDIA_H100_80GB_HBM3)."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device).replace(" ", "_")
    else:
        what = device.type
    return Path(os.path.expanduser(base)) / f"torch-{torch.__version__}" / what


def use_cache(base, device):
    """Point inductor's caches (FX graphs, AOTAutograd, Triton kernels) at `cache_folder(base, device)`; set
    before the first compilation. Returns the folder."""
    folder = cache_folder(base, device)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def compile_unet(unet, mode, regions=REGIONS, **compile_kwargs):
    """Compile `unet` in place as `mode` says (module names, processors and state-dict keys stay)."""
    import torch._dynamo.config as dynamo_config

    from attention_reg import compile_with_capture
    if mode == "off":
        return unet
    if mode == "full":
        return compile_with_capture(unet, **compile_kwargs)
    if mode != "regional":
        raise ValueError(f"runtime.compile: {mode!r} is not one of {COMPILE_MODES}")
    # Every block shares one forward: a graph per block shape (4 on SD) and per set of trained parameters (each
    # stage's), 12 for the paper's three stages; past dynamo's default limit (8) the rest would run eagerly.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    compiled = 0
    for module in unet.modules():
        if type(module).__name__ in regions:
            compile_with_capture(module, **compile_kwargs)
            compiled += 1
    if not compiled:
        raise ValueError(f"runtime.compile=regional: this U-Net has none of {regions}; use full or off")
    return unet


def compile_counts():
    """What dynamo and inductor did in this process so far: graphs compiled, recompilations, graph breaks,
    FX-graph cache hits and misses (a counter, not a timer: what a cache reuse test reads)."""
    from torch._dynamo.utils import counters
    return dict(graphs=counters["stats"]["unique_graphs"], breaks=sum(counters["graph_break"].values()),
                cache_hits=counters["inductor"]["fxgraph_cache_hit"], cache_misses=counters["inductor"]["fxgraph_cache_miss"])
