"""Estimated peak GPU memory per stage for SD 2.1-base and SDXL-base under each memory preset (the README's
table), from parameter and activation counts on the meta device (attndreambooth/memory.py).

    python scripts/memory_table.py                 # SD 2.1 at 512 px batch 8, SDXL at 1024 px batch 4
    python scripts/memory_table.py --no-bitsandbytes

The card presets are resolved as the trainer resolves them (the first way to train that fits the card);
the paper's three stages at bf16 autocast. "Estimated": only SD 2.1's default and low rows were measured.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attndreambooth import models as M  # noqa: E402
from attndreambooth.config import CARD_PRESETS, MEMORY_PRESETS, load_config  # noqa: E402
from attndreambooth.memory import current_savers, fit_card, stage_peaks  # noqa: E402
from attndreambooth.preflight import memory_sizes  # noqa: E402
from attndreambooth.sdxl import SDXL_TEXT, SDXL_UNET  # noqa: E402


def layouts():
    """{name: (meta models, resolution, batch)} for the two models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet, text = M.sd21_layout()
        sd21 = ("SD 2.1-base", unet, [text], AutoencoderKL(**M.SD21_VAE))
        texts = [CLIPTextModel(CLIPTextConfig(**c)) for c in SDXL_TEXT]
        sdxl = ("SDXL-base", UNet2DConditionModel(**SDXL_UNET), texts, AutoencoderKL(**M.SD21_VAE))
    return {"SD 2.1-base": (sd21, 512, 8), "SDXL-base": (sdxl, 1024, 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-bitsandbytes", action="store_true", help="as on a machine without the 8-bit optimizer")
    args = p.parse_args(argv)
    rows = ["| preset | model | resolution, batch | what it switches on | peak GiB stage 1 / 2 / 3 |",
            "|---|---|---|---|---|"]
    for name, (models, resolution, batch) in layouts().items():
        base = load_config(None, ["data.instance_dir=.", "data.category=dog", "output_dir=x",
                                  "runtime.mixed_precision=bf16", f"data.resolution={resolution}",
                                  *[f"stages.stage{i}.batch_size={batch}" for i in (1, 2, 3)]], check=False)
        _, sizes = memory_sizes(base, models)
        for preset in (*MEMORY_PRESETS, *CARD_PRESETS):
            cfg = copy.deepcopy(base)
            cfg.runtime.memory = preset
            if preset in MEMORY_PRESETS:
                for key, value in MEMORY_PRESETS[preset].items():
                    setattr(cfg.runtime, key, value)
                peaks = stage_peaks(sizes, _plan(cfg), current_savers(cfg), "bf16")
            else:
                for key in MEMORY_PRESETS["default"]:
                    setattr(cfg.runtime, key, None)
                _, peaks = fit_card(cfg, sizes, not args.no_bitsandbytes)
            savers = current_savers(cfg)
            what = ", ".join(k.replace("_", " ") for k, v in vars(savers).items() if v) or "nothing"
            rows.append(f"| {preset} | {name} | {resolution} px, {batch} | {what} | "
                        + " / ".join(f"{peaks[s]:.1f}" for s in ("stage1", "stage2", "stage3")) + " |")
    print("\n".join(rows))


def _plan(cfg):
    from attndreambooth.plan import Plan
    return Plan(cfg.stages)


if __name__ == "__main__":
    main()
