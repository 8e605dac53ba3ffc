"""Short runs of every model family, full and LoRA, written as a digest of every saved tensor (JSON):
what `test_families.py` compares with the digests recorded from the code before the family seam, so a
change of structure that changes a single bit of any family's weights fails. Run as a script (one thread:
the digests are of one machine's arithmetic)."""
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = {f"{layout}-{kind}": (layout, kind) for layout in ("tiny", "tiny-sd15", "tiny-sdxl") for kind in ("full", "lora")}


def digest(folder):
    """{file/tensor: sha256 of its bytes} of the run's saved weights (the embedding, the U-Net or LoRA file)."""
    from safetensors.torch import load_file
    files = ["learned_embeds.safetensors", "lora_stage3.safetensors", "attn2_stage2.safetensors",
             "pipeline/unet/diffusion_pytorch_model.safetensors"]
    out = {}
    for name in files:
        if (folder / name).is_file():
            for key, t in sorted(load_file(folder / name).items()):
                out[f"{name}/{key}"] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def main(path, names):
    import train_attndreambooth as T
    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            layout, kind = RUNS[name]
            lora = ["stages.stage2.lora_rank=4", "stages.stage3.lora_rank=4"] if kind == "lora" else []
            out = T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"model.pretrained={layout}",
                          "runtime.tensorboard=false", f"output_dir={tmp}/{name}", "stages.stage1.steps=3",
                          "stages.stage2.steps=3", "stages.stage3.steps=3", "data.views_per_image=2", *lora])
            result[name] = digest(Path(out))
    Path(path).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":  # python tests/family_runs.py OUT.json [run names]
    main(sys.argv[1], sys.argv[2:] or list(RUNS))
