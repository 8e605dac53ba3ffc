"""Helper for test_train.py, run under torchrun: the tiny run, each rank saving what it trained after
every stage; with a second argument "nan", rank 1 alone meets a NaN loss in stage 1; with "lora", stages 2
and 3 train LoRA adapters; with "sdxl", the same on the tiny SDXL model ([V] has a row in each encoder)."""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import attndreambooth.trainer.data as D
import attndreambooth.trainer.method as TR
import train_attndreambooth as T
from conftest import ROOT, tiny_overrides
from fault_runner import InjectedFaults

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
hooks = InjectedFaults(nan="stage1:2") if sys.argv[2:] == ["nan"] and rank == 1 else None
seen, original_sample, original_train_stage = {}, D.LatentBatches.sample, TR.train_stage


def sample(self, batch_size, **kwargs):
    result = original_sample(self, batch_size, **kwargs)
    latents = result[0] if isinstance(result, tuple) else result  # SDXL: (latents, size/crop ids)
    seen.setdefault("first_latents", latents.clone().contiguous())
    return result


def train_stage(planned, models, *args, **kwargs):
    rows = lambda: [e.get_input_embeddings().row.detach().clone() for e in models.text_encoders]  # noqa: E731
    init, *init_2 = rows()
    init_2 = {"init_2": init_2[0]} if init_2 else {}  # SDXL's second encoder
    result = original_train_stage(planned, models, *args, **kwargs)
    row, *second = rows()
    unet = torch.cat([p.detach().flatten() for p in models.unet.parameters()])
    second = {"row_2": second[0]} if second else {}
    save_file({"row": row, "init": init, "unet": unet, **seen, **init_2,
               **{k: v.detach().clone() for k, v in second.items()}}, out / f"rank{rank}_{planned.name}.safetensors")
    return result


D.LatentBatches.sample, TR.train_stage = sample, train_stage
lora = {f"stages.stage{i}.{k}": v for i in (2, 3) for k, v in (("lora_rank", 4), ("lr", 1e-3))}
sdxl = {"model.pretrained": "tiny-sdxl", **lora}
mode = {"lora": lora, "sdxl": sdxl}.get(sys.argv[2] if sys.argv[2:] else "", {})
T.main(["--config", str(ROOT / "configs/tiny.yaml")] + tiny_overrides(
    out / "run", **{"runtime.tensorboard": "false", **mode}), faults=hooks)
