"""Pretraining the third world's model in three phases, in resumable pieces.

1. text: the text encoder alone on captions (worlds.shapes3.text), then frozen;
2. vae: the VAE on the world's scenes and generic patterned scenes, gated on its round trip, then its latents
   normalised per channel and the normalisation folded into it (model.fold_latent_norm);
3. unet: the U-Net on fresh scenes under the frozen encoder: offset noise and timesteps tilted towards high
   noise (so the caption, not the noisy latent, decides the background), min-SNR-5 epsilon loss, 75 % full /
   15 % short / 10 % empty captions, a warm-up / stable / decay learning rate whose stable phase can be
   extended from the state kept where the decay begins, an EMA of the weights, and gates (worlds.shapes3.gates)
   measured on the EMA weights every `probe_every` steps that stop a run that is failing.

Every random draw comes from the seed and the step (or the data chunk), never from a generator carried along,
so a resumed run draws what an uninterrupted one would: the same command continues to the same bytes (same
machine, torch and thread count).
"""
import contextlib
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attention_reg import CrossAttentionCapture
from worlds.shapes.pretrain import edge_loss, encode_latents, to_tensor
from worlds.shapes.textures import random_textured_image
from worlds.shapes3.grounding import grounding_loss, grounding_weight, object_masks_of
from worlds.shapes3.model import fold_latent_norm
from worlds.shapes3.scene import random_scene
from worlds.shapes3.text import CaptionBatch, TextConditioner, TextObjective, caption_mix, fresh_batch

PHASES = ("text", "vae", "unet", "done")
# the options whose change changes the weights, by the phase from which on they matter
BINDING = {"text": ("seed", "text_steps", "text_batch", "text_lr"),
           "vae": ("vae_batch", "vae_lr", "vae_chunk"),
           "unet": ("batch", "lr", "warmup", "decay_steps", "min_snr", "ema", "offset_noise", "chunk", "passes")}
# a phase's length may change while it runs, until its decay begins (under the old length or the new): the
# steps before the decay do not depend on it, so a run can be given a longer stable phase
LENGTH = {"vae": "vae_steps", "unet": "unet_steps"}
# the grounding term's options matter from the step it begins: a run may be given it (or have it changed) while it
# has not begun under the old options or the new; a state made before they existed had none
GROUNDING = {"grounding": 0.0, "grounding_from": 0, "grounding_until": 0, "grounding_anneal": 1000}


def grounding_start(options):
    """The U-Net step from which the grounding options change anything (infinite when there is no term)."""
    return options["grounding_from"] if options["grounding"] else math.inf


def decay_start(phase, steps, args):
    return steps - (args.decay_steps if phase == "unet" else steps // 4)


def generator(*key):
    """A torch generator seeded from `key` alone, by FNV-1a (Python's hash() of a str changes per process)."""
    h = 1469598103934665603
    for byte in repr(key).encode():
        h = ((h ^ byte) * 1099511628211) % 2**64
    return torch.Generator().manual_seed(h % 2**63)


def wsd_lr(base, step, total, warmup, decay):
    """Linear warm-up, a stable phase at `base`, then a linear decay to a tenth over the last `decay` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    start = total - decay
    return base if step < start else base * (1 - 0.9 * (step - start) / max(decay, 1))


def scene_chunk(seed, phase, k, n):
    """Chunk k of a phase: n scenes, their uint8 renders and the seeds they were rendered with, from the chunk's
    own seed."""
    rng = random.Random(f"{seed}-{phase}-{k}")
    scenes = [random_scene(rng) for _ in range(n)]
    seeds = [rng.randrange(2**31) for _ in scenes]
    return scenes, [np.asarray(s.render(x)) for s, x in zip(scenes, seeds)], seeds


class Pretraining:
    """The whole pretraining's state and its three phases; `run` continues from wherever the state is."""

    def __init__(self, models, args, log, state_path, probe=None):
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = models
        self.args, self.log, self.path, self.probe = args, log, Path(state_path), probe
        self.device = torch.device(args.device)
        self.phase, self.step, self.seconds, self.gates, self.latent_stats = "text", 0, 0.0, [], None
        self.conditioner = TextConditioner(self.text_encoder, args.seed)
        self.objective = TextObjective(self.text_encoder.config.hidden_size)
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(self.device)
        self.text_opt = torch.optim.AdamW(list(self.text_encoder.parameters()) + list(self.objective.parameters()),
                                          lr=args.text_lr, weight_decay=0.0)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.unet.parameters()]
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=args.lr, weight_decay=1e-2)
        self._chunk = (None, None)  # (key, data) of the chunk in memory
        self._masks = (None, None)  # (chunk, its objects' masks), made at the chunk's first grounded step

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self):
        bound = [k for p in PHASES[:3] for k in BINDING[p]] + list(LENGTH.values()) + list(GROUNDING)
        return dict(phase=self.phase, step=self.step, seconds=self.seconds, gates=self.gates,
                    latent_stats=self.latent_stats, args={k: getattr(self.args, k) for k in bound},
                    text_encoder=self.text_encoder.state_dict(), objective=self.objective.state_dict(),
                    text_opt=self.text_opt.state_dict(), vae=self.vae.state_dict(), vae_opt=self.vae_opt.state_dict(),
                    unet=self.unet.state_dict(), ema=self.ema, opt=self.opt.state_dict())

    def save(self, path=None):
        path = Path(path or self.path)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # a kill mid-write leaves the previous state whole

    def changed_options(self, s):
        """The options that differ from those the state was made with, for the phases it has reached."""
        reached = PHASES[:PHASES.index(s["phase"]) + 1]
        keys = [k for p in reached if p in BINDING for k in BINDING[p]]
        changed = [k for k in keys if s["args"].get(k) != getattr(self.args, k)]
        for phase, key in LENGTH.items():
            if phase not in reached or s["args"][key] == getattr(self.args, key):
                continue
            old, new = (decay_start(phase, n, self.args) for n in (s["args"][key], getattr(self.args, key)))
            if s["phase"] != phase or s["step"] > min(old, new):  # its decay has begun, or it is over
                changed.append(key)
        old = {k: s["args"].get(k, v) for k, v in GROUNDING.items()}
        new = {k: getattr(self.args, k) for k in GROUNDING}
        begun = s["phase"] == "done" or s["step"] > min(grounding_start(old), grounding_start(new))
        if "unet" in reached and old != new and begun:
            changed += [k for k in GROUNDING if old[k] != new[k]]
        return changed

    def load(self, path=None):
        s = torch.load(path or self.path, map_location=self.device, weights_only=False)
        if changed := self.changed_options(s):
            made = ", ".join(f"--{k} {s['args'].get(k, GROUNDING.get(k))}" for k in changed)
            raise ValueError(f"{path or self.path} was made with other options ({made}); rerun with those to "
                             "continue it, or pass --restart to start over")
        self.phase, self.step, self.seconds = s["phase"], s["step"], s["seconds"]
        self.gates, self.latent_stats = s["gates"], s["latent_stats"]
        self.text_encoder.load_state_dict(s["text_encoder"])
        self.objective.load_state_dict(s["objective"])
        self.text_opt.load_state_dict(s["text_opt"])
        self.vae.load_state_dict(s["vae"])
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.unet.load_state_dict(s["unet"])
        torch._foreach_copy_(self.ema, s["ema"])
        self.opt.load_state_dict(s["opt"])
        if self.phase != "text":
            self.text_encoder.requires_grad_(False).eval()
        if self.phase in ("unet", "done"):  # as the VAE phase leaves it: its encoder's output differs in train mode
            self.vae.requires_grad_(False).eval()

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, time_limit_s=None, checkpoint_s=300):
        """Train until done, past `time_limit_s` (this process's seconds), stopped by a gate, or asked to stop by
        SIGTERM (at the end of the step it is in, after a checkpoint there): "done", "time", "gate" or
        "stopped"."""
        from attndreambooth.trainer.signals import SIGTERM_STOP
        start = last_save = time.perf_counter()
        if self.probe and self.probe.blocked(self):
            return "gate"
        with SIGTERM_STOP as stop:
            while self.phase != "done":
                t0, phase = time.perf_counter(), self.phase
                stop.in_steps = True
                verdict = getattr(self, f"{self.phase}_step")()
                stop.in_steps = False  # a SIGTERM from here on (a checkpoint being written) is Ctrl-C
                self.seconds += time.perf_counter() - t0
                now = time.perf_counter()
                out_of_time = time_limit_s is not None and now - start >= time_limit_s
                if verdict or self.phase != phase or out_of_time or stop.requested or now - last_save >= checkpoint_s:
                    self.save()
                    last_save = now
                    self.log(f"checkpoint: {self.phase} step {self.step}, {self.seconds:.0f} s of training")
                if verdict == "gate":
                    return "gate"
                if stop.requested:
                    return "stopped"
                if out_of_time and self.phase != "done":
                    return "time"
        return "done"

    def keep_stable(self, phase, steps):
        """Where a phase's decay begins, a copy of the state (OUT/stable_<phase>.pt): a longer run of that phase
        (a larger --vae_steps or --unet_steps, with --from_stable PHASE) branches off there."""
        if self.step == decay_start(phase, steps, self.args):
            self.save(self.path.with_name(f"stable_{phase}.pt"))
            self.log(f"kept {self.path.with_name(f'stable_{phase}.pt')}: the {phase} phase's decay begins here")

    def _next_phase(self, phase):
        self.phase, self.step = phase, 0

    # -- 1. the text encoder ----------------------------------------------------------------------------
    def text_step(self):
        a = self.args
        batch = fresh_batch(self.tokenizer, random.Random(f"{a.seed}-text-{self.step}"), a.text_batch, random_scene)
        for group in self.text_opt.param_groups:
            group["lr"] = wsd_lr(a.text_lr, self.step, a.text_steps, 50, a.text_steps // 2)
        self.text_encoder.train()
        loss, terms = self.objective(self.conditioner.encode(batch, self.device), batch)
        self.text_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.text_opt.step()
        self.step += 1
        if self.step % 100 == 0 or self.step == a.text_steps:
            self.log(f"text step {self.step}/{a.text_steps} " + " ".join(f"{k} {v.item():.4f}" for k, v in terms.items()))
        if self.step >= a.text_steps:
            self.text_opt.zero_grad(set_to_none=True)
            self.text_encoder.requires_grad_(False).eval()
            verdict = self.probe.text(self) if self.probe else None
            self._next_phase("vae")
            return verdict

    # -- 2. the VAE -------------------------------------------------------------------------------------
    def _data(self, key, make):
        if self._chunk[0] != key:
            self._chunk = (key, make())
        return self._chunk[1]

    def vae_step(self):
        a = self.args
        per_chunk = a.vae_chunk * 2 // a.vae_batch  # each image used twice
        k, i = divmod(self.step, per_chunk)

        def make():
            _, images, _ = scene_chunk(a.seed, "vae", k, a.vae_chunk - a.vae_chunk // 3)
            rng = random.Random(f"{a.seed}-textures-{k}")
            images = to_tensor(images + [random_textured_image(rng) for _ in range(a.vae_chunk // 3)])
            g = generator(a.seed, "vae-order", k)
            return images, torch.cat([torch.randperm(len(images), generator=g) for _ in range(2)])

        images, order = self._data(("vae", k), make)
        g = generator(a.seed, "vae", self.step)
        x = images[order[i * a.vae_batch:(i + 1) * a.vae_batch]]
        y, xo = torch.randint(0, x.shape[-1] - 32 + 1, (2,), generator=g).tolist()
        x = x[:, :, y:y + 32, xo:xo + 32].to(self.device)  # the VAE is convolutional: crops teach it as well
        for group in self.vae_opt.param_groups:
            group["lr"] = wsd_lr(a.vae_lr, self.step, a.vae_steps, 100, a.vae_steps - decay_start("vae", a.vae_steps, a))
        self.vae.train()
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(self.device)).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + edge_loss(recon, x) + 1e-4 * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        self.step += 1
        self.keep_stable("vae", a.vae_steps)
        if self.step % 200 == 0 or self.step == a.vae_steps:
            self.log(f"vae step {self.step}/{a.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f}")
        if self.step >= a.vae_steps:
            self.vae.eval().requires_grad_(False)
            self.normalise_latents()
            verdict = self.probe.vae(self) if self.probe else None
            self._next_phase("unet")
            return verdict

    def encode(self, images):
        return encode_latents(self.vae, images, self.device)

    def normalise_latents(self):
        """Per-channel mean and std of the posterior means of 2,048 scenes of their own seed, folded into the VAE."""
        _, images, _ = scene_chunk(self.args.seed, "latent-stats", 0, 2048)
        mean = self.encode(to_tensor(images))[0]
        m, s = mean.mean((0, 2, 3)), mean.std((0, 2, 3))
        fold_latent_norm(self.vae, m, s)
        self.latent_stats = dict(mean=m.tolist(), std=s.tolist())
        self.log("vae latents normalised per channel (folded into quant_conv / post_quant_conv): std before "
                 + " ".join(f"{v:.2f}" for v in s.tolist()))

    # -- 3. the U-Net -----------------------------------------------------------------------------------
    def unet_step(self):
        a = self.args
        per_chunk = a.chunk * a.passes // a.batch
        k, i = divmod(self.step, per_chunk)
        tic = time.perf_counter()

        def make():
            scenes, images, seeds = scene_chunk(a.seed, "unet", k, a.chunk)
            mean, std = self.encode(to_tensor(images))
            g = generator(a.seed, "unet-order", k)
            order = torch.cat([torch.randperm(len(scenes), generator=g) for _ in range(a.passes)])
            return scenes, mean, std, order, seeds

        fresh = self._chunk[0] != ("unet", k)
        scenes, mean, std, order, seeds = self._data(("unet", k), make)
        data_s = time.perf_counter() - tic if fresh else 0.0
        index = order[i * a.batch:(i + 1) * a.batch]
        g, rng = generator(a.seed, "unet", self.step), random.Random(f"{a.seed}-captions-{self.step}")
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=g).to(self.device)
        batch = CaptionBatch(self.tokenizer, [scenes[j] for j in index.tolist()],
                             [caption_mix(rng) for _ in range(len(index))])
        with torch.no_grad():
            cond = self.conditioner.encode(batch, self.device)
        T = self.scheduler.config.num_train_timesteps
        # offset noise: a per-channel shift of the whole latent, which the flat backgrounds are made of
        noise = torch.randn(latents.shape, generator=g) + a.offset_noise * torch.randn(
            (*latents.shape[:2], 1, 1), generator=g)
        noise = noise.to(self.device)
        t = (T * torch.rand(len(index), generator=g).sqrt()).long().clamp(max=T - 1).to(self.device)  # density ~ t
        alphas = self.scheduler.alphas_cumprod.to(self.device)
        snr = alphas[t] / (1 - alphas[t])
        for group in self.opt.param_groups:
            group["lr"] = wsd_lr(a.lr, self.step, a.unet_steps, a.warmup, a.decay_steps)
        self.unet.train()
        w = grounding_weight(self.step, a.grounding, a.grounding_from, a.grounding_until, a.grounding_anneal)
        with CrossAttentionCapture(self.unet, expected_layers=None) if w else contextlib.nullcontext() as cap:
            pred = self.unet(self.scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * snr.clamp(max=a.min_snr) / snr).mean()
        ground = None
        if w:
            if self._masks[0] != k:  # once a chunk: each scene comes back `passes` times
                self._masks = (k, object_masks_of(scenes, seeds))
            masks = self._masks[1][index].to(self.device)
            ground = grounding_loss(cap.maps, batch.labels["which"].to(self.device), masks)
            loss = loss + w * ground
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        decay = min(a.ema, (self.step + 1) / (self.step + 10))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.unet.parameters()], 1 - decay)
        self.step += 1
        if data_s:
            self.log(f"unet chunk {k}: {a.chunk} fresh scenes rendered and encoded in {data_s:.1f} s")
        if self.step % 100 == 0:
            self.log(f"unet step {self.step}/{a.unet_steps} loss {loss.item():.4f} "
                     + (f"grounding {ground.item():.4f} x {w:.4g} " if ground is not None else "")
                     + f"({time.perf_counter() - tic:.2f} s this step)")
        self.keep_stable("unet", a.unet_steps)
        verdict = self.probe.unet(self) if self.probe and (self.step % a.probe_every == 0
                                                           or self.step == a.unet_steps) else None
        if self.step >= a.unet_steps:
            self.phase = "done"
        return verdict

    def ema_into_unet(self):
        """The EMA weights into the U-Net (what is saved), in eval mode."""
        with torch.no_grad():
            torch._foreach_copy_(list(self.unet.parameters()), self.ema)
        self.unet.eval()
