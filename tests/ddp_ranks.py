"""Helper for test_train.py, run under torchrun: the tiny run, each rank saving what it trained after
every stage; with a second argument "nan", rank 1 alone meets a NaN loss in stage 1; with "lora", stages 2
and 3 train LoRA adapters."""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attndreambooth.data as D  # noqa: E402
import attndreambooth.training as TR  # noqa: E402
import train_attndreambooth as T  # noqa: E402
from conftest import ROOT, tiny_overrides  # noqa: E402
from fault_runner import FaultHooks  # noqa: E402

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
hooks = FaultHooks(nan="stage1:2") if sys.argv[2:] == ["nan"] and rank == 1 else None
seen, original_sample, original_run_stage = {}, D.LatentSampler.sample, TR.run_stage


def sample(self, batch_size):
    latents = original_sample(self, batch_size)
    seen.setdefault("first_latents", latents.clone().contiguous())
    return latents


def run_stage(name, stage, models, *args, **kwargs):
    init = models.text_encoder.get_input_embeddings().row.detach().clone()
    result = original_run_stage(name, stage, models, *args, **kwargs)
    row = models.text_encoder.get_input_embeddings().row.detach().clone()
    unet = torch.cat([p.detach().flatten() for p in models.unet.parameters()])
    save_file({"row": row, "init": init, "unet": unet, **seen}, out / f"rank{rank}_{name}.safetensors")
    return result


D.LatentSampler.sample, TR.run_stage = sample, run_stage
lora = {f"stages.stage{i}.{k}": v for i in (2, 3) for k, v in (("lora_rank", 4), ("lr", 1e-3))}
T.main(["--config", str(ROOT / "configs/tiny.yaml")] + tiny_overrides(
    out / "run", **{"runtime.tensorboard": "false", **(lora if sys.argv[2:] == ["lora"] else {})}), hooks=hooks)
