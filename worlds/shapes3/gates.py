"""What the pretraining measures as it goes, and the gates that stop it when it fails.

After the text phase: each head's accuracy, the RGB error, and the constant tokens' spread against the nouns'.
After the VAE phase: the round trip of 300 scenes read back, and each concept's identity after it.
Every `probe_every` U-Net steps, on the EMA weights (what would be saved): how much the denoiser uses its caption
(epsilon error with another scene's caption over its own, at t = 200, 500, 800), 50 held-out captions sampled
(DPM++ 15 steps, CFG 7.5) and read back, the shape word's attention IoU with its object and the spatial entropy
of its map, the second object's word's IoU, and the correlation between the shape word's map and the background
word's (near 1 when every word attends alike, as in the second world).
Gates are decided before the run (GATES); a missed gate saves the state and stops: the same command meets the
same gate again, and --override_gates continues past it (the log says so).
"""
import json
import random

import numpy as np
import torch

from worlds.scoring import attention_iou
from worlds.shapes3.read import alignment, describe, identity, match_objects, wanted
from worlds.shapes3.scene import CONCEPTS, Scene, Thing, concept_photos, random_scene, stands_out

TEXT_GATE = {"accuracy": 0.995, "spread ratio": 0.05, "rgb error": 10.0}
VAE_GATE = {"shape": 0.98, "colour": 0.98, "pattern": 0.98, "second": 0.98, "identity": 0.9}
FIRST_WORLD_CAPTION_USE = {200: 1.36, 500: 1.80, 800: 1.76}  # tools/caption_use.py on models/shapes_v1
GATES = {  # samples seen -> the least each number may be
    100_000: {"background": 0.65, "caption use": round(sum(FIRST_WORLD_CAPTION_USE.values()) / 3, 2)},
    230_000: {"background": 0.85, "shape": 0.50, "shape iou": 0.30},
    460_000: {"background": 0.90, "shape": 0.70, "second": 0.65, "shape iou": 0.40},
}
PROBE_STEPS, PROBE_CFG = 15, 7.5


def held_out_scenes(n, seed=0):
    """Held-out scenes as a caption can say them: appearance words at their own colours (no offset). Passed over:
    a word whose own colours do not stand out from the scene's background (e.g. harlequin's grey-green on grey),
    which the world never draws and the readers could not read from a perfect render."""
    rng = random.Random(f"held-out-{seed}")
    scenes = []
    while len(scenes) < n:
        s = random_scene(rng)
        if s.main.appearance:
            s = Scene(Thing(s.main.shape, appearance=s.main.appearance), s.size, s.position, s.background, s.second)
            if not stands_out(s.main, s.background):
                continue
        scenes.append(s)
    return scenes


def attention_numbers(scene, maps, seen):
    """(shape-word IoU, its map's spatial entropy / log(pixels), correlation of its map with the background
    word's or None, second word's IoU or None, the main object's first colour or appearance word's IoU or None)
    for one image's (77, h, w) maps. The colour word is one a grounding term never supervises."""
    roles = [r for _, r in scene.tokens()]
    m = maps.numpy()
    shape_map = m[1 + roles.index("noun")]
    main, second = match_objects(seen, wanted(scene))
    iou = attention_iou(shape_map, main["blob"].mask) if main else 0.0
    p = shape_map.ravel() / shape_map.sum()
    entropy = float(-(p * np.log(np.maximum(p, 1e-12))).sum() / np.log(p.size))
    bg_map = m[1 + roles.index("background")] if "background" in roles else None
    corr = (float(np.corrcoef(shape_map.ravel(), bg_map.ravel())[0, 1])  # undefined for a flat map
            if bg_map is not None and shape_map.std() > 0 and bg_map.std() > 0 else None)
    second_iou = None
    if scene.second:
        second_iou = attention_iou(m[1 + roles.index("second_noun")], second["blob"].mask) if second else 0.0
    said, colour_iou = [i for i, r in enumerate(roles) if r in ("colour", "appearance")], None
    if said:
        colour_iou = attention_iou(m[1 + said[0]], main["blob"].mask) if main else 0.0
    return iou, entropy, corr, second_iou, colour_iou


def colour_said(scene):
    """How a caption names its main object's colours: "appearance" (a word that is a pattern in two colours of
    its own: met within an RGB tolerance), "two colours" (a pattern in two palette colours) or "plain"."""
    return "appearance" if scene.main.appearance else "two colours" if scene.main.pattern else "plain"


def accuracy(scenes, images, seen=None):
    """{attribute: share of images that meet it} for one image per scene, colour also by how the caption says it
    (the three differ in kind: palette names are met by the nearest name, an appearance word's colours by RGB),
    and a two-colour pattern's accuracy pattern by pattern."""
    totals = {}
    for scene, image, found in zip(scenes, images, seen or [None] * len(scenes)):
        checks = alignment(image, scene, found)[1]
        if "colour" in checks:
            checks[f"colour ({colour_said(scene)})"] = checks["colour"]
        if scene.main.pattern and "pattern" in checks:  # two palette colours: dotted and bordered are near twins
            checks[f"pattern ({scene.main.pattern})"] = checks["pattern"]
        for key, ok in checks.items():
            hit, n = totals.get(key, (0, 0))
            totals[key] = (hit + ok, n + 1)
    return {k: h / n for k, (h, n) in totals.items()}


def ceiling(scenes):
    """accuracy() of each scene's own render: what a perfect model would score on these captions."""
    return accuracy(scenes, [s.render(k) for k, s in enumerate(scenes)])


def read_back(pipe, scenes, steps=PROBE_STEPS, seed=0, batch_size=10):
    """accuracy() of one sampled image per scene's caption, and the attention numbers' means."""
    from attndreambooth.inference.sampling import sample_prompts
    images, seen, numbers = [None] * len(scenes), [None] * len(scenes), [None] * len(scenes)
    captions = [s.caption() for s in scenes]
    for k, drawn, maps in sample_prompts(pipe, captions, 1, seed, batch_size, steps=steps,
                                         guidance_scale=PROBE_CFG, attention_maps=True):
        images[k], seen[k] = drawn[0], describe(drawn[0])
        numbers[k] = attention_numbers(scenes[k], maps[0], seen[k])
    mean = lambda xs: float(np.mean([x for x in xs if x is not None])) if any(x is not None for x in xs) else None  # noqa: E731
    iou, entropy, corr, second, colour = zip(*numbers)
    return {**accuracy(scenes, images, seen), "shape iou": mean(iou), "shape entropy": mean(entropy),
            "shape-background correlation": mean(corr), "second iou": mean(second), "colour word iou": mean(colour)}


@torch.no_grad()
def caption_use(run, scenes=64, timesteps=(200, 500, 800), seed=0):
    """{t: epsilon error with another scene's caption / with its own}, EMA U-Net, fresh scenes."""
    from worlds.shapes.pretrain import to_tensor
    from worlds.shapes3.text import CaptionBatch
    rng = random.Random(f"caption-use-{seed}")
    drawn = [random_scene(rng) for _ in range(scenes)]
    latents = run.encode(to_tensor([np.asarray(s.render(rng.randrange(2**31))) for s in drawn]))[0]
    own = run.conditioner.encode(CaptionBatch(run.tokenizer, drawn, [()] * scenes), run.device)
    other = torch.roll(own, 1, 0)
    out = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t)).to(run.device)
        steps = torch.full((scenes,), t, device=run.device)
        noisy = run.scheduler.add_noise(latents, noise, steps)
        err = [float(torch.nn.functional.mse_loss(run.unet(noisy, steps, c).sample, noise)) for c in (own, other)]
        out[t] = err[1] / err[0]
    return out


def vae_round_trip(vae, n=300):
    """Accuracy of each attribute after encode (posterior mean) and decode of `n` scenes, each concept's identity
    after the round trip of 8 of its photos, and the least of those identities."""
    from worlds.shapes.world_report import round_trip
    rng = random.Random("round-trip-0")
    scenes = [random_scene(rng) for _ in range(n)]
    hits = {}
    for i in range(0, n, 50):
        images = round_trip(vae, [s.render(rng.randrange(2**31)) for s in scenes[i:i + 50]])
        for scene, image in zip(scenes[i:i + 50], images):
            for key, ok in alignment(image, scene)[1].items():
                hits[key] = hits.get(key, 0) + ok
    ids = {c: float(np.mean([identity(im, c) for im in round_trip(vae, [im for _, im in concept_photos(c, 8, 123)])]))
           for c in CONCEPTS}
    return {**{k: v / n for k, v in hits.items()}, **{f"identity {c}": v for c, v in ids.items()},
            "identity": min(ids.values())}


class Probe:
    """The measurements and gates, called by the pretraining at the end of each phase and every probe_every
    U-Net steps."""

    def __init__(self, log, override=False, captions=50):
        self.log, self.override, self.captions = log, override, captions

    def blocked(self, run):
        """Whether the run stands at a gate it missed (logged); with --override_gates it goes on, noted."""
        last = run.gates[-1] if run.gates else {}
        if not last.get("missed") or last.get("overridden"):
            return False
        if self.override:
            last["overridden"] = True
            self.log(f"gate {last['where']}: missed {last['missed']}; continuing because --override_gates was given")
            return False
        self.log(f"gate {last['where']} was missed ({', '.join(last['missed'])}); the run stays stopped. "
                 "--override_gates continues past it")
        return True

    def _verdict(self, run, where, numbers, floors):
        missed = {k: (numbers.get(k), v) for k, v in floors.items()
                  if numbers.get(k) is None or (numbers[k] > v if k in ("spread ratio", "rgb error") else numbers[k] < v)}
        run.gates.append(dict(where=where, step=run.step, numbers=numbers, floors=floors, missed=sorted(missed),
                              overridden=bool(missed) and self.override))
        self.log(f"gate {where}: {json.dumps(numbers)}")
        if not missed:
            self.log(f"gate {where}: passed")
            return None
        said = ", ".join(f"{k} {v if v is None else round(v, 4)} (needs {'<=' if k in ('spread ratio', 'rgb error') else '>='} {f})"
                         for k, (v, f) in missed.items())
        if self.override:
            self.log(f"gate {where}: MISSED ({said}); continuing because --override_gates was given")
            return None
        self.log(f"gate {where}: MISSED ({said}); the run stops here. Diagnose from the numbers above; "
                 "--override_gates continues past it")
        return "gate"

    def text(self, run):
        from worlds.shapes3.text import text_report
        r = text_report(run.conditioner, run.objective, run.tokenizer, random_scene)
        numbers = {**r, "accuracy": min(v for k, v in r.items() if k.endswith("accuracy")),
                   "spread ratio": r["constant spread"] / r["noun spread"], "rgb error": r["rgb error (0-255)"]}
        return self._verdict(run, "text encoder", numbers, TEXT_GATE)

    def vae(self, run):
        return self._verdict(run, "vae round trip", vae_round_trip(run.vae), VAE_GATE)

    def unet(self, run):
        from worlds.shapes.model import assemble_pipeline
        kept = [p.detach().clone() for p in run.unet.parameters()]
        run.ema_into_unet()
        try:
            pipe = assemble_pipeline(run.vae, run.text_encoder, run.tokenizer, run.unet, run.scheduler, "dpm++")
            pipe.set_progress_bar_config(disable=True)
            use = caption_use(run)
            numbers = {f"caption use t={t}": v for t, v in use.items()}
            numbers["caption use"] = float(np.mean(list(use.values())))
            numbers.update(read_back(pipe, held_out_scenes(self.captions)))
        finally:
            with torch.no_grad():
                torch._foreach_copy_(list(run.unet.parameters()), kept)
            run.unet.train()
        samples = run.step * run.args.batch
        due = [s for s in GATES if samples >= s and not any(g["where"] == f"{s} samples" for g in run.gates)]
        if not due:
            run.gates.append(dict(where=f"step {run.step} ({samples} samples)", numbers=numbers))
            self.log(f"probe at step {run.step} ({samples} samples): {json.dumps(numbers)}")
            return None
        return self._verdict(run, f"{due[0]} samples", numbers, GATES[due[0]])
