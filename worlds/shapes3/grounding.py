"""An optional grounding term for the U-Net phase (TokenCompose's token loss, Wang et al. 2024): each object
word's cross-attention should fall on its object. Off unless asked for (`--grounding`), on from a step, and
annealed to zero before the learning rate's decay begins, so the model that is saved was trained its last
steps without it; the probes report the IoU of words it never supervised (colour and appearance words) beside
the nouns it did.

For a caption's main noun and second noun (CaptionBatch.labels["which"] 0 and 1) and each attn2 layer at a
latent grid of at least MIN_SIDE, with A the layer's map of that word (heads averaged, pixels of that grid)
and M its object's coverage pooled to the grid: loss = mean over (word, layer) of (1 - sum(A * M) / sum(A))^2.
"""
import torch
import torch.nn.functional as F

MIN_SIDE = 8  # grids coarser than this (4x4, 2x2) hold an object in one or two cells: nothing to place


def grounding_weight(step, weight, start, until, anneal):
    """`weight` from step `start`, falling linearly over the last `anneal` steps before `until` to 0 there."""
    if weight == 0 or step < start or step >= until:
        return 0.0
    return weight * min(1.0, (until - step) / anneal)


def grounding_loss(maps, which, masks):
    """maps: the attn2 layers' probabilities [(B, heads, pixels, tokens)]; which: (B, tokens) long, 0 at the
    main noun, 1 at the second noun, else anything else; masks: (B, 2, H, W) each object's coverage (zeros for
    an absent second object). The mean over the (word, layer) pairs of (1 - the attention inside / all of it)^2;
    0 when no caption names an object."""
    total, count = maps[0].new_zeros(()), 0
    for m in maps:
        side = int(round(m.shape[2] ** 0.5))
        if side < MIN_SIDE:
            continue
        grid = F.adaptive_avg_pool2d(masks.to(m.dtype), side).flatten(2)  # (B, 2, pixels)
        attention = m.mean(1)  # (B, pixels, tokens)
        for obj in (0, 1):
            rows, cols = (which == obj).nonzero(as_tuple=True)
            if not len(rows):
                continue
            a = attention[rows, :, cols]  # (words, pixels)
            inside = (a * grid[rows, obj]).sum(-1) / a.sum(-1).clamp_min(1e-12)
            total = total + ((1 - inside) ** 2).sum()
            count += len(rows)
    return total / max(count, 1)


def object_masks_of(scenes, seeds):
    """(n, 2, 64, 64) float16: each scene's main and second object's coverage as rendered with its seed (zeros for
    no second object). Coverage is a count of 4x4 sub-pixels over 16, so float16 holds it exactly."""
    from worlds.shapes3.scene import object_masks
    out = torch.zeros(len(scenes), 2, 64, 64, dtype=torch.float16)
    for i, (scene, seed) in enumerate(zip(scenes, seeds)):
        for j, mask in enumerate(object_masks(scene, seed)):
            if mask is not None:
                out[i, j] = torch.from_numpy(mask)
    return out
