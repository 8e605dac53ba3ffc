"""Pretraining the shapes world's model from scratch, in pieces: fresh scenes, checkpoints, resume.

Data comes in chunks of scenes drawn fresh from the grammar (chunk k from its own seed), each used
`passes` times in a random order, so no scene is seen more than a couple of times and a resumed run
draws exactly the scenes the uninterrupted one would. The state (weights, EMA, optimiser, generator,
step) is written at chunk boundaries, atomically, every few minutes and when a time limit is reached;
the same command continues it to the same bytes as an uninterrupted run (same machine and torch).

Two phases: the VAE (recon L1 + MSE + edge L1 + a small KL term, on 32x32 crops: it is convolutional) on the
grammar's scenes and generic patterned scenes (worlds.shapes.textures), then the U-Net and text
encoder together (epsilon objective, min-SNR weighting, classifier-free caption dropout, short captions,
an EMA of the weights), on latents encoded chunk by chunk by the frozen VAE.
"""
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worlds.shapes.scene import OMITTABLE, random_scene
from worlds.shapes.textures import random_textured_image

# the options whose change changes the weights: a checkpoint is only continued under the same ones; those of
# the U-Net phase only once it has begun (the VAE phase never reads them: its bytes are the same either way)
VAE_ARGS = ("seed", "latent_channels", "vae_steps", "vae_batch", "vae_lr", "vae_chunk", "chunk", "passes")
RESULT_ARGS = VAE_ARGS + ("unet_steps", "batch", "lr", "warmup", "min_snr", "ema", "caption_dropout", "short_prob")


def to_tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def scene_chunk(seed, phase, k, n):
    """Chunk k of a phase: n (scene, uint8 image) pairs of the grammar, from their own seed."""
    rng = random.Random(f"{seed}-{phase}-{k}")
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, [np.asarray(s.render(rng.randrange(2**31))) for s in scenes]


def vae_chunk(seed, k, n):
    """Chunk k of the VAE's images: two thirds grammar scenes, one third generic patterned scenes."""
    _, images = scene_chunk(seed, "vae", k, n - n // 3)
    rng = random.Random(f"{seed}-textures-{k}")
    return to_tensor(images + [random_textured_image(rng) for _ in range(n // 3)])


@torch.no_grad()
def encode_latents(vae, images, device, chunk=256):
    """(posterior means, posterior stds) of a tensor of images, `chunk` at a time."""
    dists = [vae.encode(images[i:i + chunk].to(device)).latent_dist for i in range(0, len(images), chunk)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def edge_loss(recon, x):
    """L1 between the images' finite differences: the pixel losses alone let a small star's points blur into a
    blob (the first world's VAE kept 74 % of shapes); this term prices each blurred edge."""
    dx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
    dy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(x)) + F.l1_loss(dy(recon), dy(x))


def cosine_lr(base, step, total, warmup):
    """Linear warm-up, then a cosine down to a tenth of `base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1)))))


def captions_for(scenes, index, short_prob, empty_prob, gen):
    """One caption per sampled scene: with `short_prob` a short one, each attribute left out with chance 1/2
    (so "a <v> star" and "a striped star on a blue background" are in distribution, as SD's captions say more
    or less), the whole caption empty with `empty_prob` (classifier-free guidance), else the full caption."""
    draws = torch.rand(len(index), len(OMITTABLE) + 2, generator=gen).tolist()
    return ["" if d[-1] < empty_prob else scenes[i].caption(
        omit=[a for a, u in zip(OMITTABLE, d) if u < 0.5] if d[-2] < short_prob else ())
        for i, d in zip(index.tolist(), draws)]


class Pretraining:
    """The whole pretraining's state and its two phases; `run` continues from wherever the state is."""

    def __init__(self, models, args, device, log, state_path):
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = models
        self.args, self.device, self.log, self.path = args, torch.device(device), log, Path(state_path)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.phase, self.step, self.seconds, self.scale = "vae", 0, 0.0, None
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(self.device)
        self.denoiser_params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.ema = [p.detach().clone() for p in self.denoiser_params]
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW(self.denoiser_params, lr=args.lr, weight_decay=1e-2)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self):
        return dict(phase=self.phase, step=self.step, seconds=self.seconds, scale=self.scale,
                    gen=self.gen.get_state(), args={k: getattr(self.args, k) for k in RESULT_ARGS},
                    vae=self.vae.state_dict(), vae_opt=self.vae_opt.state_dict(), unet=self.unet.state_dict(),
                    text_encoder=self.text_encoder.state_dict(), ema=self.ema, opt=self.opt.state_dict())

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous state whole

    def load(self):
        s = torch.load(self.path, map_location=self.device, weights_only=False)
        binding = VAE_ARGS if s["phase"] == "vae" else RESULT_ARGS
        changed = [k for k in binding if s["args"].get(k) != getattr(self.args, k)]
        if changed:
            made = ", ".join(f"--{k} {s['args'][k]}" for k in changed)
            raise ValueError(f"{self.path} was made with other options ({made}); rerun with those to continue it, "
                             "or pass --restart to start over")
        self.phase, self.step, self.seconds, self.scale = s["phase"], s["step"], s["seconds"], s["scale"]
        self.gen.set_state(s["gen"])
        self.vae.load_state_dict(s["vae"])
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.unet.load_state_dict(s["unet"])
        self.text_encoder.load_state_dict(s["text_encoder"])
        torch._foreach_copy_(self.ema, s["ema"])
        self.opt.load_state_dict(s["opt"])
        if self.scale is not None:
            self.vae.register_to_config(scaling_factor=self.scale)

    # -- the phases -------------------------------------------------------------------------------------
    def run(self, time_limit_s=None, checkpoint_s=300):
        """Train until done or past `time_limit_s` (this process's seconds); True when done."""
        start = last_save = time.perf_counter()
        while self.phase != "done":
            t0 = time.perf_counter()
            (self.vae_chunk_steps if self.phase == "vae" else self.unet_chunk_steps)()
            self.seconds += time.perf_counter() - t0
            now = time.perf_counter()
            out_of_time = time_limit_s is not None and now - start >= time_limit_s
            if self.phase == "done" or out_of_time or now - last_save >= checkpoint_s:
                self.save()
                last_save = now
                self.log(f"checkpoint: {self.phase} step {self.step}, {self.seconds:.0f} s of training")
            if out_of_time and self.phase != "done":
                return False
        return True

    def vae_chunk_steps(self):
        a = self.args
        per_chunk = a.vae_chunk * a.passes // a.vae_batch
        images = vae_chunk(a.seed, self.step // per_chunk, a.vae_chunk)
        order = torch.cat([torch.randperm(len(images), generator=self.gen) for _ in range(a.passes)])
        self.vae.train()
        for i in range(per_chunk):
            if self.step >= a.vae_steps:
                break
            x = images[order[i * a.vae_batch:(i + 1) * a.vae_batch]]
            y, xo = torch.randint(0, x.shape[-1] - 32 + 1, (2,), generator=self.gen).tolist()
            x = x[:, :, y:y + 32, xo:xo + 32].to(self.device)
            for group in self.vae_opt.param_groups:
                group["lr"] = cosine_lr(a.vae_lr, self.step, a.vae_steps, 100)
            dist = self.vae.encode(x).latent_dist
            noise = torch.randn(dist.mean.shape, generator=self.gen).to(self.device)
            recon = self.vae.decode(dist.mean + dist.std * noise).sample
            kl = dist.kl().mean() / x[0].numel()
            loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + edge_loss(recon, x) + 1e-4 * kl
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.step += 1
            if self.step % 200 == 0 or self.step == a.vae_steps:
                self.log(f"vae step {self.step}/{a.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f}")
        if self.step >= a.vae_steps:
            self.vae.eval().requires_grad_(False)
            self.scale = self.latent_scale()
            self.vae.register_to_config(scaling_factor=self.scale)
            self.log(f"vae done; latents {self.vae.config.latent_channels}x16x16, scaling factor {self.scale:.4f}")
            self.phase, self.step = "unet", 0

    def encode(self, images):
        return encode_latents(self.vae, images, self.device)

    def latent_scale(self):
        """1 / the latents' std, as SD's scaling factor, from 2,048 scenes of their own seed (as many as a
        U-Net chunk holds if that is fewer, down to 256)."""
        _, images = scene_chunk(self.args.seed, "scale", 0, max(256, min(2048, self.args.chunk)))
        return float(1 / self.encode(to_tensor(images))[0].std())

    def unet_chunk_steps(self):
        a = self.args
        self.vae.eval().requires_grad_(False)
        per_chunk = a.chunk * a.passes // a.batch
        scenes, images = scene_chunk(a.seed, "unet", self.step // per_chunk, a.chunk)
        mean, std = self.encode(to_tensor(images))
        order = torch.cat([torch.randperm(len(scenes), generator=self.gen) for _ in range(a.passes)])
        alphas = self.scheduler.alphas_cumprod
        snr = alphas / (1 - alphas)
        weight = (snr.clamp(max=a.min_snr) / snr).to(self.device)  # min-SNR-gamma for the epsilon objective
        T = self.scheduler.config.num_train_timesteps
        self.unet.train()
        self.text_encoder.train()
        tic = time.perf_counter()
        for i in range(per_chunk):
            if self.step >= a.unet_steps:
                break
            for group in self.opt.param_groups:
                group["lr"] = cosine_lr(a.lr, self.step, a.unet_steps, a.warmup)
            index = order[i * a.batch:(i + 1) * a.batch]
            eps = torch.randn(mean[index].shape, generator=self.gen).to(self.device)
            latents = (mean[index] + std[index] * eps) * self.scale
            ids = self.tokenizer(captions_for(scenes, index, a.short_prob, a.caption_dropout, self.gen),
                                 padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            noise = torch.randn(latents.shape, generator=self.gen).to(self.device)
            t = torch.randint(0, T, (a.batch,), generator=self.gen).to(self.device)
            pred = self.unet(self.scheduler.add_noise(latents, noise, t), t, self.text_encoder(ids)[0]).sample
            loss = (F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * weight[t]).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.denoiser_params, 1.0)
            self.opt.step()
            decay = min(a.ema, (self.step + 1) / (self.step + 10))
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.denoiser_params], 1 - decay)
            self.step += 1
            if self.step % 100 == 0 or self.step == a.unet_steps:
                self.log(f"unet step {self.step}/{a.unet_steps} loss {loss.item():.4f} "
                         f"({(time.perf_counter() - tic) / (i + 1):.2f} s/step)")
        if self.step >= a.unet_steps:
            self.phase = "done"

    def ema_into_models(self):
        """The EMA weights into the U-Net and text encoder (what is saved), both in eval mode."""
        with torch.no_grad():
            torch._foreach_copy_(self.denoiser_params, self.ema)
        self.unet.eval()
        self.text_encoder.eval()
