"""The run's plan, built once from the config: the stages that run, in order, what each trains and
what each saves. The trainer, the config check, preflight and infer.py all read this one object."""
from dataclasses import dataclass

import torch

from attndreambooth.config.schema import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))  # the one dtype table
UNET_PARTS = {"cross_attention", "unet"}
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA run's adapters, under diffusers' default name:
#                                                 pipe.load_lora_weights(run_dir) finds it
KOHYA_LORA_FILE = "pytorch_lora_weights_kohya.safetensors"  # the same, for ComfyUI, AUTOMATIC1111 and kohya
#                                                 (the name diffusers' --output_kohya_format gives it)


def is_lora(stage):
    """True if a stage's config trains LoRA adapters instead of the U-Net weights it names."""
    return (stage.lora_rank or 0) > 0 and bool(UNET_PARTS & set(stage.train))


@dataclass(frozen=True)
class PlannedStage:
    name: str
    number: int  # 1-based position among the config's stages (infer.py --stage)
    config: object  # its StageConfig
    holds: frozenset  # parts a checkpoint of this stage holds: [V] and everything trained up to here

    @property
    def lora(self):
        return is_lora(self.config)

    @property
    def saves(self):
        """Files this stage writes into the run folder when it ends (a LoRA stage: the run's adapters so far)."""
        files = ["learned_embeds.safetensors"] if "embedding" in self.config.train else []
        if self.lora:
            return files + [f"lora_{self.name}.safetensors"]
        return files + ([f"attn2_{self.name}.safetensors"] if "cross_attention" in self.config.train else [])


class Plan:
    def __init__(self, stages):
        """`stages`: the config's {name: StageConfig}, in run order; disabled or 0-step stages are skipped."""
        self.all_names = list(stages)
        self.stages, held = [], {"embedding"}
        for number, (name, stage) in enumerate(stages.items(), start=1):
            if stage.enabled and stage.steps > 0:
                held |= ((set(stage.train) - UNET_PARTS) | {"lora"}) if is_lora(stage) else set(stage.train)
                self.stages.append(PlannedStage(name, number, stage, frozenset(held)))

    def __iter__(self):
        return iter(self.stages)

    def __bool__(self):
        return bool(self.stages)

    @property
    def names(self):
        return [s.name for s in self.stages]

    def __getitem__(self, name):
        return next(s for s in self.stages if s.name == name)

    def trained_parts(self):
        return set().union(*(s.config.train for s in self.stages)) if self.stages else set()

    @property
    def lora(self):
        """True if the run's U-Net changes are LoRA adapters (config.validate: all such stages or none)."""
        return any(s.lora for s in self.stages)

    def state_after(self, number):
        """What the state after config stage `number` (1-based) is made of: ("pipeline", []) when it is the
        final state, else ("base", [attn2 files]) over the base model with the learned embedding."""
        if not isinstance(number, int) or not 1 <= number <= len(self.all_names):
            raise ValueError(f"--stage {number}: the run has stages 1..{len(self.all_names)} "
                             f"({', '.join(self.all_names)})")
        done = [s for s in self.stages if s.number <= number]
        if not self.stages or done == self.stages:
            return "pipeline", []
        lora_files = [f for s in done for f in s.saves if f.startswith("lora_")]
        if lora_files:  # each holds the run's adapters up to its stage
            return "base", lora_files[-1:]
        if any("unet" in s.config.train for s in done):
            raise ValueError(f"--stage {number}: the whole U-Net trained by then and only the final one is saved")
        return "base", [f for s in done for f in s.saves if f.startswith("attn2_")]
