"""Memory estimates and card presets: the estimate reproduces its calibration (SD 2.1-base on an H100), the
meta-device activation count equals a real forward's, a card preset takes the least approximate way to
train that fits, and what a user sets explicitly wins."""
from dataclasses import replace

import pytest
import torch

from attndreambooth.config.loading import load_config
from attndreambooth.config.schema import ConfigError
from attndreambooth.families import by_name
from attndreambooth.trainer.memory import (CARDS, HEADROOM, LADDER, activation_elements, current_savers, fit_card, stage_peaks)
from attndreambooth.config.plan import Plan
from attndreambooth.trainer.preflight import fit_memory, memory_sizes
from conftest import SAMPLE

SD21 = [f"data.instance_dir={SAMPLE}", "data.category=toy", "output_dir=x", "runtime.mixed_precision=bf16"]


def test_estimate_reproduces_the_sd21_measurement():
    cfg = load_config(None, SD21)  # the default hub id: the built-in SD 2.1-base layout, batch 8, 512 px
    _, sizes = memory_sizes(cfg)
    assert sizes["unet"] == 865_910_724 and abs(sizes["activations"] - 431.25e6) < 0.01e6
    for savers, measured in ((LADDER[0], 22.9), (LADDER[2], 10.8)):  # docs/reports/gpu_results.md, stage 3
        assert stage_peaks(sizes, Plan(cfg.stages), savers, "bf16")["stage3"] == pytest.approx(measured, abs=0.05)


def test_meta_activation_count_equals_a_real_forward(tiny_pipe):
    unet, total = tiny_pipe.unet, [0]
    hooks = [m.register_forward_hook(lambda m, a, o: total.__setitem__(0, total[0] + o.numel()))
             for m in unet.modules() if not list(m.children())]
    with torch.no_grad():
        unet(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 77, 32))
    for h in hooks:
        h.remove()
    assert activation_elements(unet.to("meta"), 8, by_name("sd")) == total[0] > 0  # 64 px: an 8x8 latent


@pytest.mark.parametrize("card, bitsandbytes", [("24gb", True), ("16gb", True), ("16gb", False), ("12gb", False)])
def test_card_preset_takes_the_first_way_that_fits(card, bitsandbytes):
    cfg = load_config(None, SD21 + [f"runtime.memory={card}"])
    _, sizes = memory_sizes(cfg)
    savers, peaks = fit_card(cfg, sizes, {"bitsandbytes": bitsandbytes, "torchao": True})
    budget = CARDS[card] * HEADROOM
    assert max(peaks.values()) <= budget
    usable = [s for s in LADDER if bitsandbytes or not s.optimizer_8bit]
    for earlier in usable[:usable.index(savers)]:  # every less approximate way is over the budget
        assert max(stage_peaks(sizes, Plan(cfg.stages), earlier, "bf16").values()) > budget
    assert current_savers(cfg) == savers  # and the config now says so
    assert all(s.lora_rank == (32 if savers.lora and s.train != ["embedding"] else 0) for s in cfg.stages.values())


def test_explicit_settings_win_over_a_card_preset():
    cfg = fit_memory(load_config(None, SD21 + ["runtime.memory=24gb", "runtime.gradient_checkpointing=false"]))
    assert cfg.runtime.gradient_checkpointing is False
    cfg = fit_memory(load_config(None, SD21 + ["runtime.memory=12gb", "stages.stage3.lora_rank=8"]))
    assert (cfg.stages["stage2"].lora_rank, cfg.stages["stage3"].lora_rank) == (32, 8)  # a set rank stays
    with pytest.raises(ConfigError, match="runtime.half_frozen_weights"):
        load_config(None, SD21[:-1] + ["runtime.half_frozen_weights=true"])  # needs mixed precision


def test_an_explicit_switch_that_breaks_the_card_is_refused_naming_it():
    """A card preset never starts a plan estimated over its card: the switch set in the config that keeps every
    way over it is named, with the estimate (computed here independently) and what the preset alone would take."""
    cfg = load_config(None, SD21 + ["runtime.memory=12gb", "runtime.gradient_checkpointing=false",
                                    "runtime.half_frozen_weights=false"])  # else 8-bit weights would fit it
    _, sizes = memory_sizes(cfg)
    with pytest.raises(ConfigError) as e:
        fit_memory(cfg)
    way = replace(LADDER[-1], gradient_checkpointing=False, half_frozen_weights=False)
    worst = max(stage_peaks(sizes, Plan(cfg.stages), way, "bf16").values())
    assert worst > CARDS["12gb"] * HEADROOM
    said = str(e.value)
    assert said.startswith(f"config key 'runtime.memory': 12gb leaves 10.8 GiB for training, and the plan is "
                           f"estimated at {worst:.1f} GiB with runtime.gradient_checkpointing=false, set in the config")
    assert said.endswith("remove runtime.gradient_checkpointing=false, or set runtime.memory=default to run the "
                         "config as written")


def test_an_explicit_rank_of_zero_stays_full_weights_under_a_card_preset():
    zero = ["stages.stage2.lora_rank=0", "stages.stage3.lora_rank=0"]
    cfg = fit_memory(load_config(None, SD21 + ["runtime.memory=24gb"] + zero))
    assert not Plan(cfg.stages).lora and cfg.stages["stage3"].lora_rank == 0
    with pytest.raises(ConfigError, match="with stages.stage2.lora_rank=0 and stages.stage3.lora_rank=0, set in "
                                          "the config; without them the preset would take"):
        fit_memory(load_config(None, SD21 + ["runtime.memory=12gb", "runtime.optimizer_8bit=false"] + zero))
    unset = load_config(None, SD21)  # outside a card preset an unset rank is resolved to full weights
    assert all(s.lora_rank == 0 for s in unset.stages.values())
