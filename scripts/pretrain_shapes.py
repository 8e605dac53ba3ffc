"""Pretrain the shapes world's text-to-image model from scratch on a CPU, then measure how well it follows
prompts. Reproducible from --seed; writes a stock diffusers folder (fp16 safetensors).

    python scripts/pretrain_shapes.py --out runs/shapes_model      # the shipped model (see README)
    python scripts/pretrain_shapes.py --out /tmp/s --vae_steps 50 --unet_steps 50 --eval_captions 8   # a smoke run

1. VAE: recon (L1 + MSE) + a small KL term, on 32x32 crops (4x cheaper; the VAE is convolutional) of
   the grammar's scenes and of generic patterned scenes (attndreambooth.shapes.textures), so that the
   frozen VAE can encode a concept's pattern it never saw.
2. Every training image encoded once (posterior mean and std); the latent scale set to 1/std as SD's.
3. U-Net and text encoder together on the epsilon objective with min-SNR-5 weighting (Hang et al. 2023:
   several times faster convergence), 10 % of captions dropped (empty prompt) for classifier-free
   guidance; an EMA of the weights (decay 0.999) is what is saved.
4. Held-out captions sampled with the stock pipeline (DPM++, CFG 7.5, 25 steps) and read back with
   attndreambooth.shapes.read: the accuracy of each attribute.
"""
import argparse
import json
import random
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attndreambooth.config_checks import folder_problem  # noqa: E402
from attndreambooth.shapes.model import build  # noqa: E402
from attndreambooth.shapes.scene import OMITTABLE, random_scene  # noqa: E402
from attndreambooth.shapes.textures import random_textured_image  # noqa: E402


def to_tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def dataset(n, seed):
    """n (scene, uint8 image) pairs drawn from the grammar; concepts never appear."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, to_tensor([np.asarray(s.render(rng.randrange(2**31))) for s in scenes])


def train_vae(vae, images, steps, batch, lr, gen, log, crop=32):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        x = x[:, :, i:i + crop, j:j + crop]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, chunk=256):
    means, stds = [], []
    for i in range(0, len(images), chunk):
        dist = vae.encode(images[i:i + chunk]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def captions_for(scenes, index, short_prob, empty_prob, gen):
    """One caption per sampled scene: with `short_prob` a short one, each attribute left out with chance 1/2
    (so "a <v> star" and "a star on a blue background" are in distribution, as SD's captions say more or
    less), the whole caption empty with `empty_prob` (classifier-free guidance), else the full caption."""
    draws = torch.rand(len(index), len(OMITTABLE) + 2, generator=gen).tolist()
    return ["" if d[-1] < empty_prob else scenes[i].caption(
        omit=[a for a, u in zip(OMITTABLE, d) if u < 0.5] if d[-2] < short_prob else ())
        for i, d in zip(index.tolist(), draws)]


def train_denoiser(unet, text_encoder, tokenizer, scheduler, scenes, mean, std, scale, args, gen, log):
    """Returns the EMA of the trained parameters (the U-Net's, then the text encoder's)."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    weight = snr.clamp(max=args.min_snr) / snr  # min-SNR-gamma for the epsilon objective
    unet.train()
    text_encoder.train()
    start, T = time.perf_counter(), scheduler.config.num_train_timesteps
    for step in range(args.unet_steps):
        lr = args.lr * min(1.0, (step + 1) / 200)  # warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        index = torch.randint(len(mean), (args.batch,), generator=gen)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=gen)) * scale
        batch_ids = tokenizer(captions_for(scenes, index, args.short_prob, args.caption_dropout, gen),
                              padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, T, (args.batch,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            cond = text_encoder(batch_ids)[0]
            pred = unet(scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (step + 1) / (step + 10))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 100 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step + 1}/{args.unet_steps} loss {loss.item():.4f} "
                f"({(time.perf_counter() - start) / (step + 1):.2f} s/step)")
    unet.eval()
    text_encoder.eval()
    return ema


def saved_pipeline(folder):
    """The saved model as infer.py loads it (fp32, DPM-Solver++)."""
    from infer import load_pipe
    return load_pipe(base=folder)[0]


def evaluate(pipe, n, seed, log):
    """Per-attribute accuracy on `n` held-out captions, one image each (DPM++, CFG 7.5, 25 steps)."""
    from attndreambooth.shapes.read import alignment
    rng = random.Random(f"held-out-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    hits, totals, scores = {}, {}, []
    for i in range(0, n, 8):
        chunk = scenes[i:i + 8]
        images = pipe([s.caption() for s in chunk], num_inference_steps=25, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(seed + i)).images
        for scene, image in zip(chunk, images):
            score, checks = alignment(image, scene)
            scores.append(score)
            for key, ok in checks.items():
                hits[key] = hits.get(key, 0) + ok
                totals[key] = totals.get(key, 0) + 1
        log(f"eval {min(i + 8, n)}/{n}: mean alignment {np.mean(scores):.3f}")
    return dict(captions=n, alignment=float(np.mean(scores)), accuracy={k: hits[k] / totals[k] for k in totals})


def caption_grid(pipe, path, n=12, seed=1):
    """A picture of the base model following prompts: held-out captions, each with its sample."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(f"grid-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    images = pipe([sc.caption() for sc in scenes], num_inference_steps=25, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(seed)).images
    cell, text_h, cols = 192, 40, 4
    grid = Image.new("RGB", (cols * cell, (n + cols - 1) // cols * (cell + text_h)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, (scene, image) in enumerate(zip(scenes, images)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        caption = "\n".join(textwrap.wrap(scene.caption(), width=30)[:3])  # ~6 px a character
        draw.multiline_text((x + 2, y + cell + 2), caption, fill="black", font=font, spacing=1)
    grid.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline (and report.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=12000, help="captioned scenes (the VAE also gets half as many "
                   "patterned ones)")
    p.add_argument("--vae_steps", type=int, default=4000)
    p.add_argument("--vae_batch", type=int, default=32)
    p.add_argument("--unet_steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min_snr", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--short_prob", type=float, default=0.3, help="chance of a short caption (attributes left out)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the U-Net phase")
    p.add_argument("--eval_captions", type=int, default=200)
    p.add_argument("--eval_only", action="store_true", help="measure (and picture) an existing --out, no training")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.eval_only and (out / "model_index.json").is_file() and not args.overwrite:
        p.error(f"--out {out} already holds a model; choose another folder, or pass --overwrite to replace it")
    if not args.eval_only and (problem := folder_problem(out)):
        p.error(f"--out: {problem}")
    if args.eval_only and not (out / "model_index.json").is_file():
        p.error(f"--eval_only: {out} holds no model (no model_index.json)")
    if args.eval_only:
        report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
        pipe = saved_pipeline(out)
        report["eval"] = evaluate(pipe, args.eval_captions, args.seed, print)
        caption_grid(pipe, out / "samples.png")
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return report
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "pretrain.log", "w")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tokenizer, text_encoder, vae, unet, scheduler = build(args.seed)
    scenes, images = dataset(args.images, args.seed)
    rng = random.Random(f"textures-{args.seed}")
    textured = to_tensor([random_textured_image(rng) for _ in range(args.images // 2)])
    log(f"{len(scenes)} scenes and {len(textured)} patterned images rendered in {time.perf_counter() - t0:.0f} s")
    train_vae(vae, torch.cat([images, textured]), args.vae_steps, args.vae_batch, 1e-3, gen, log)
    del textured
    mean, std = encode_all(vae, images)
    scale = float(1 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"latents {tuple(mean.shape[1:])}, scaling factor {scale:.4f}; {time.perf_counter() - t0:.0f} s so far")
    ema = train_denoiser(unet, text_encoder, tokenizer, scheduler, scenes, mean, std, scale, args, gen, log)
    with torch.no_grad():
        torch._foreach_copy_(list(unet.parameters()) + list(text_encoder.parameters()), ema)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False,
                                                                       steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    train_s = time.perf_counter() - t0
    log(f"saved {out} after {train_s:.0f} s")
    report = dict(seed=args.seed, args=vars(args), train_seconds=round(train_s), torch=torch.__version__)
    if args.eval_captions:
        pipe = saved_pipeline(out)
        report["eval"] = evaluate(pipe, args.eval_captions, args.seed, log)
        log(json.dumps(report["eval"]))
        caption_grid(pipe, out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
