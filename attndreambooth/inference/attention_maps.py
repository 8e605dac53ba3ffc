"""Per-token cross-attention maps during sampling, as in the paper's Figures 2, 5 and 12.

Maps are averaged over heads, the attn2 layers (each resized to one grid) and the denoising
steps. Only a running sum is kept: one step's maps at a time, never the whole trajectory.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


class AttentionMapAverager:
    """Use as `callback_on_step_end` of a diffusers pipeline inside `self.capture` (a capture of every text
    token's column, `Family.token_maps`): after each step it folds that step's maps into a running sum of shape
    (images, text tokens, *grid); grid = latent (h, w)."""

    def __init__(self, capture, num_images, grid):
        self.capture = capture
        self.num_images, self.grid, self.sum, self.count = num_images, grid, None, 0

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.add(self.capture.maps)
        self.capture.clear()
        return callback_kwargs

    @torch.no_grad()
    def add(self, maps):
        for m in maps:  # (B, heads, HW, tokens); with guidance B = 2 * images, the conditional half last
            m = m[-self.num_images:].float().mean(dim=1)  # (images, HW, 77)
            gh, gw = self.grid
            h = round(gh / (gh * gw / m.shape[1]) ** 0.5)  # this layer's grid has the latent's aspect ratio
            m = m.transpose(1, 2).reshape(self.num_images, -1, h, m.shape[1] // h)  # (images, 77, h, w)
            m = F.interpolate(m, size=(gh, gw), mode="bilinear", align_corners=False)
            self.sum = m if self.sum is None else self.sum + m
            self.count += 1

    def average(self):
        """(images, tokens, h, w): each pixel's token weights sum to 1 (over the text keys)."""
        return (self.sum / self.count).cpu()


def _colormap(x):
    """Values in [0, 1] -> RGB uint8 (a dark-blue, teal, yellow ramp like viridis)."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)
    pos = np.clip(x, 0, 1) * (len(anchors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return (anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).astype(np.uint8)


def token_labels(tokenizer, input_ids):
    """(position, text) of the prompt's tokens, start and end tokens and padding left out (CLIP starts with
    <|startoftext|>, T5 with the first word)."""
    ids, start = input_ids.tolist(), int(tokenizer.bos_token_id is not None)
    end = ids.index(tokenizer.eos_token_id, start) if tokenizer.eos_token_id in ids[start:] else len(ids)
    return [(i, tokenizer.convert_ids_to_tokens(ids[i]).replace("</w>", "").replace("▁", ""))
            for i in range(start, end)]


def figure(images, maps, labels, title, panel=128):
    """One row per image: the image, then one heat map per token over it, labelled with the token."""
    font = ImageFont.load_default()
    head, label_h = 18, 16
    cols = 1 + len(labels)
    fig = Image.new("RGB", (cols * panel, head + len(images) * (panel + label_h)), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((4, 3), title, fill="black", font=font)
    for r, (image, m) in enumerate(zip(images, maps)):
        y = head + r * (panel + label_h)
        base = image.convert("RGB").resize((panel, panel))
        fig.paste(base, (0, y))
        draw.text((4, y + panel + 2), "image", fill="black", font=font)
        for c, (pos, text) in enumerate(labels, start=1):
            a = m[pos].numpy()
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)  # each token scaled to its own range
            heat = Image.fromarray(_colormap(a)).resize((panel, panel), Image.BILINEAR)
            fig.paste(Image.blend(base.convert("L").convert("RGB"), heat, 0.65), (c * panel, y))
            draw.text((c * panel + 4, y + panel + 2), text[:18], fill="black", font=font)
    return fig
