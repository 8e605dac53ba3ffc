"""How much a shapes-world model's denoiser uses its caption: the epsilon error with each scene's own
caption against another scene's caption and the empty one, on fresh scenes at three noise levels. A model
that follows its prompts predicts the noise much better from the right caption (ratio well above 1).

    python tools/caption_use.py models/shapes_v1         # the first world's model: 1.36x / 1.80x / 1.76x
    python tools/caption_use.py runs/shapes_v2           # the second's: 1.13x / 1.25x / 1.29x
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # worlds/ and bench/ live beside the package

import numpy as np
import torch


@torch.no_grad()
def caption_use(model, scenes=128, timesteps=(200, 500, 800), seed=0):
    """{t: {"true": mse, "shuffled": mse, "empty": mse}} on `scenes` fresh scenes of the world."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from worlds.shapes.pretrain import to_tensor
    from worlds.shapes.scene import random_scene
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    rng = random.Random(f"caption-use-{seed}")
    drawn = [random_scene(rng) for _ in range(scenes)]
    x = to_tensor([np.asarray(s.render(rng.randrange(2**31))) for s in drawn])
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    captions = [s.caption() for s in drawn]

    def encode(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    conditions = {"true": encode(captions), "shuffled": encode(captions[1:] + captions[:1]),
                  "empty": encode([""] * scenes)}
    noising = DDPMScheduler.from_config(pipe.scheduler.config)
    result = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        steps = torch.full((scenes,), t)
        noisy = noising.add_noise(latents, noise, steps)
        result[t] = {name: float(np.mean([torch.nn.functional.mse_loss(
            pipe.unet(noisy[i:i + 32], steps[i:i + 32], c[i:i + 32]).sample, noise[i:i + 32]).item()
            for i in range(0, scenes, 32)])) for name, c in conditions.items()}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a shapes-world pipeline folder")
    p.add_argument("--scenes", type=int, default=128)
    args = p.parse_args(argv)
    for t, errors in caption_use(args.model, args.scenes).items():
        print(f"t={t}: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items())
              + f"; another scene's caption / its own: {errors['shuffled'] / errors['true']:.2f}x")


if __name__ == "__main__":
    main()
