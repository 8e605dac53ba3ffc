"""The text encoder's own pretraining, before any U-Net step, after which it is frozen (as SD freezes CLIP).

A denoiser trained jointly with its text encoder through the denoising loss alone can read the caption
globally (the second world's did: every token's attention map was the same map): under CLIP's causal mask the
end-of-text and padding tokens see the whole caption, and a jointly trained encoder can put the meaning there.
Here the encoder learns from the captions alone, with objectives that put each content word's attributes in
that word's own output state and keep every other token constant:
- linear heads read, from each noun, its object's shape, pattern, size, colours (RGB) and whether it is the
  second object; from colour words their RGB; from pattern and appearance words their pattern (and an
  appearance's RGB pair); from position words the position; from "background" the background;
- a constancy loss pulls the start token, function words, end-of-text and padding to their batch mean per
  token, so they carry no caption content.
Appearance words' colours vary (scene.SPREAD): a fixed random offset on the word's token embedding, linear in the
colour shift, says by how much; only pretraining adds it (`TextConditioner`), the saved model has none.
"""
import random

import torch
import torch.nn.functional as F

from worlds.shapes.scene import BACKGROUNDS, COLOURS, POSITIONS, SHAPES
from worlds.shapes3.scene import APPEARANCES, OMITTABLE, PATTERNS, RADII, SPREAD

CLASSES = {"shape": SHAPES, "pattern": ("plain",) + PATTERNS + ("unsaid",), "size": tuple(RADII) + ("unsaid",),
           "position": tuple(POSITIONS), "background": BACKGROUNDS, "which": ("main", "second")}
CONSTANT_ROLES = ("fn", "start", "end", "pad")


def caption_mix(rng, full=0.75, short=0.15):
    """What one training caption leaves out: () for a full caption (chance `full`), a random half of OMITTABLE
    for a short one (`short`), None for the empty caption (the rest: classifier-free guidance)."""
    u = rng.random()
    if u < full:
        return ()
    if u < full + short:
        return tuple(a for a in OMITTABLE if rng.random() < 0.5)
    return None


def _rgb(c):
    return [x / 127.5 - 1 for x in c]


class CaptionBatch:
    """Token ids of captions and, per position, what each head should read there (targets -100 / NaN where
    nothing), which positions must stay constant, and each appearance word's colour offset."""

    def __init__(self, tokenizer, scenes, omits):
        vocab = tokenizer.get_vocab()
        n, length = len(scenes), tokenizer.model_max_length
        self.ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
        self.labels = {k: torch.full((n, length), -100, dtype=torch.long) for k in CLASSES}
        self.rgb = torch.full((n, length, 6), float("nan"))
        self.constant = torch.zeros(n, length, dtype=torch.bool)
        self.appearance = torch.full((n, length), -1, dtype=torch.long)
        self.offset = torch.zeros(n, length, 6)
        words = list(APPEARANCES)
        for b, (scene, omit) in enumerate(zip(scenes, omits)):
            tokens = [] if omit is None else scene.tokens(omit=omit)
            self.ids[b, 0], self.ids[b, len(tokens) + 1] = tokenizer.bos_token_id, tokenizer.eos_token_id
            self.constant[b] = True
            for i, (word, role) in enumerate(tokens, start=1):
                self.ids[b, i] = vocab[word + "</w>"]
                self.constant[b, i] = role == "fn"
                self._label(b, i, role, word, scene, omit, words)
        self.captions = [None if o is None else s.caption(omit=o) for s, o in zip(scenes, omits)]

    def _label(self, b, i, role, word, scene, omit, words):
        lab, m = self.labels, scene.main
        if role == "size":
            lab["size"][b, i] = CLASSES["size"].index(word)
        elif role in ("colour", "bg_colour", "second_colour"):
            self.rgb[b, i, :3] = torch.tensor(_rgb(COLOURS[word]))
        elif role == "pattern":
            lab["pattern"][b, i] = CLASSES["pattern"].index(word)
        elif role == "appearance":
            pattern, (c1, c2) = m.look()
            lab["pattern"][b, i] = CLASSES["pattern"].index(pattern)
            self.rgb[b, i] = torch.tensor(_rgb(c1) + _rgb(c2))
            self.appearance[b, i] = words.index(word)
            self.offset[b, i] = torch.tensor(m.offset, dtype=torch.float32) / SPREAD
        elif role == "noun":
            said_colour = "colour" not in omit and (m.colour or m.appearance)
            pattern = m.look()[0] if said_colour else (m.pattern or "unsaid")
            lab["shape"][b, i], lab["which"][b, i] = SHAPES.index(word), 0
            lab["pattern"][b, i] = CLASSES["pattern"].index(pattern)
            lab["size"][b, i] = CLASSES["size"].index(scene.size if "size" not in omit else "unsaid")
            if said_colour:
                c1, c2 = m.look()[1]
                self.rgb[b, i] = torch.tensor(_rgb(c1) + _rgb(c2))
        elif role == "second_noun":
            lab["shape"][b, i], lab["which"][b, i] = SHAPES.index(word), 1
            self.rgb[b, i, :3] = torch.tensor(_rgb(COLOURS[scene.second.colour]))
        elif role == "position":
            lab["position"][b, i] = CLASSES["position"].index(word)
        elif role == "background":
            lab["background"][b, i] = BACKGROUNDS.index(scene.background)


class TextConditioner:
    """The text encoder with pretraining's appearance offsets: `encode(batch)` adds, at each appearance word,
    offset (6 numbers in [-1, 1]) @ that word's fixed random (6, width) matrix to its token embedding."""

    def __init__(self, text_encoder, seed):
        self.text_encoder = text_encoder
        width = text_encoder.config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        std = text_encoder.config.initializer_range  # the token embeddings' own scale at initialisation
        self.directions = torch.randn(len(APPEARANCES), 6, width, generator=gen) * std
        self._extra = None
        text_encoder.get_input_embeddings().register_forward_hook(self._add)

    def _add(self, module, inputs, output):
        return output if self._extra is None else output + self._extra.to(output.dtype)

    def encode(self, batch, device="cpu"):
        has = (batch.appearance >= 0).unsqueeze(-1)
        directions = self.directions[batch.appearance.clamp(min=0)]  # (B, L, 6, width)
        self._extra = (torch.einsum("blk,blkd->bld", batch.offset, directions) * has).to(device)
        try:
            return self.text_encoder(batch.ids.to(device))[0]
        finally:
            self._extra = None


class TextObjective(torch.nn.Module):
    """The heads and the loss: cross-entropy per head, MSE on RGB (in [-1, 1]), and the constancy term."""

    def __init__(self, width):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in CLASSES.items()})
        self.rgb = torch.nn.Linear(width, 6)

    def forward(self, states, batch):
        terms = {k: F.cross_entropy(head(states).flatten(0, 1), batch.labels[k].flatten(), ignore_index=-100)
                 for k, head in self.heads.items() if (batch.labels[k] >= 0).any()}
        known = ~batch.rgb.isnan()
        terms["rgb"] = F.mse_loss(self.rgb(states)[known], batch.rgb[known])
        terms["constancy"] = constancy(states, batch.ids, batch.constant)
        return sum(terms.values()), terms


def constancy(states, ids, constant):
    """Mean squared distance (per channel) of the constant positions' states from their token's batch mean."""
    h, tok = states[constant], ids[constant]
    uniq, group = tok.unique(return_inverse=True)
    means = torch.zeros(len(uniq), h.shape[-1], dtype=h.dtype).index_add_(0, group, h)
    means = means / torch.bincount(group, minlength=len(uniq)).unsqueeze(-1)
    return ((h - means[group]) ** 2).mean()


def fresh_batch(tokenizer, rng: random.Random, n, random_scene):
    scenes = [random_scene(rng) for _ in range(n)]
    return CaptionBatch(tokenizer, scenes, [caption_mix(rng) for _ in scenes])


@torch.no_grad()
def text_report(conditioner, objective, tokenizer, random_scene, n=2048, seed=0):
    """On `n` fresh captions: each head's accuracy, the RGB heads' mean absolute error (0-255 units), and the
    constant tokens' spread (RMS distance from their token's mean) against the nouns' spread."""
    batch = fresh_batch(tokenizer, random.Random(f"text-report-{seed}"), n, random_scene)
    states = conditioner.encode(batch)
    out = {}
    for k, head in objective.heads.items():
        known = batch.labels[k] >= 0
        out[f"{k} accuracy"] = float((head(states).argmax(-1)[known] == batch.labels[k][known]).float().mean())
    known = ~batch.rgb.isnan()
    out["rgb error (0-255)"] = float((objective.rgb(states)[known] - batch.rgb[known]).abs().mean() * 127.5)
    nouns = batch.labels["which"] >= 0
    out["constant spread"] = float(constancy(states, batch.ids, batch.constant).sqrt())
    out["noun spread"] = float(((states[nouns] - states[nouns].mean(0)) ** 2).mean().sqrt())
    return out
