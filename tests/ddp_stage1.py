"""Helper for test_train.py, run under torchrun: stage 1 on the tiny model, each rank saves its [V] row."""
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attndreambooth.data as D  # noqa: E402
import attndreambooth.training as TR  # noqa: E402
import train_attndreambooth as T  # noqa: E402
from conftest import ROOT, tiny_overrides  # noqa: E402

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
seen, original_sample, original_run_stage = {}, D.LatentSampler.sample, TR.run_stage


def sample(self, batch_size):
    latents = original_sample(self, batch_size)
    seen.setdefault("first_latents", latents.clone().contiguous())
    return latents


def run_stage(name, stage, models, *args, **kwargs):
    init = models.text_encoder.get_input_embeddings().row.detach().clone()
    result = original_run_stage(name, stage, models, *args, **kwargs)
    row = models.text_encoder.get_input_embeddings().row.detach().clone()
    save_file({"row": row, "init": init, **seen}, out / f"rank{rank}.safetensors")
    return result


D.LatentSampler.sample, TR.run_stage = sample, run_stage
T.main(["--config", str(ROOT / "configs/tiny.yaml")] + tiny_overrides(
    out / "run", **{"stages.stage1.steps": 4, "stages.stage2.enabled": "false", "stages.stage3.enabled": "false"}))
