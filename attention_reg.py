"""AttnDreamBooth's cross-attention regulariser (Pang et al. 2024, Eq. 2).

One idea in one file: a processor that records the softmax cross-attention
probabilities of chosen text tokens, a context manager that installs it on the
U-Net's `attn2` layers (self-attention stays on the stock SDPA processor), and a
pure loss function over the recorded maps.
"""
from contextlib import AbstractContextManager, contextmanager

import torch

SD_CROSS_ATTENTION_LAYERS = 16  # SD 1.x / 2.x: 6 down + 1 mid + 9 up
REDUCTIONS = ("per_layer", "pooled")


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. gradient-checkpoint recomputation). Never while
    torch.compile traces: a compiled graph's recomputation does not run Python again, and asking autograd
    here would split the U-Net's graph at every attn2 layer."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class CaptureProcessor:
    """Cross-attention with explicit softmax probabilities; hands chosen columns to `record`."""

    def __init__(self, record, token_indices=None):
        self.record = record
        self.token_indices = None if token_indices is None else list(token_indices)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        batch, n_keys = encoder_hidden_states.shape[:2]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = query @ key.transpose(-1, -2) * attn.scale  # (B, heads, HW, 77)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])
        probs = scores.float().softmax(dim=-1)  # fp32 softmax, also under autocast
        picked = probs if self.token_indices is None else probs[..., self.token_indices]  # (B, heads, HW, k)
        if not in_backward():  # a checkpoint recomputation runs the same ops but adds no maps
            self.record(picked)
        hidden_states = probs.to(value.dtype) @ value  # (B, heads, HW, head_dim)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def forward_order(name):
    """Sort key that puts a U-Net's module names in the order its forward runs them: down blocks, the mid
    block, then up blocks, each by index (named_modules lists the mid block last, after the up blocks)."""
    part, *rest = name.split(".")
    return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(part, 3),
            [int(p) if p.isdigit() else p for p in rest])


def cross_attention_processors(model):
    """The processor names of a model's cross-attention modules (diffusers' Attention built with a
    cross_attention_dim), in forward order: found by what each module is, not by how a family names it."""
    from diffusers.models.attention_processor import Attention
    return sorted((f"{name}.processor" for name, m in model.named_modules()
                   if isinstance(m, Attention) and m.is_cross_attention), key=forward_order)


class LayerMaps:
    """One layer's recorded maps. Each layer has its own list, so a compiled block sees the same state (an
    empty list) in every layer: a list shared by all layers would have another length at each layer, and
    torch.compile guards on that length, compiling a repeated block once per layer, past its recompile limit."""

    def __init__(self):
        self.maps = []

    def record(self, probs):  # a Python method, not the list's builtin append: older dynamo cannot trace that
        self.maps.append(probs)


class CrossAttentionCapture(AbstractContextManager):
    """Record cross-attention probabilities of `token_indices` in every `attn2` layer of a U-Net.

    While active, each U-Net forward adds to `.maps` one tensor per hooked layer, in
    forward order, of shape (batch, heads, query_pixels, len(token_indices)), or all key
    columns when `token_indices` is None. The graph is kept, so a loss on `.maps`
    trains the layers. Call `clear()` between steps. On exit the original processors
    come back, also after an exception.
    """

    def __init__(self, unet, token_indices=None, expected_layers=SD_CROSS_ATTENTION_LAYERS, layers=None,
                 processor=None):
        """`expected_layers`: how many cross-attention layers the U-Net must have (None: any number); `layers`:
        the processor names to hook (default: every cross-attention layer, as the U-Net's naming says);
        `processor(record, token_indices)`: the recording processor of another attention (a transformer's
        joint attention: then `layers` names the processors, and is required)."""
        self.unet, self.token_indices, self.expected_layers = unet, token_indices, expected_layers
        self.layers, self.slots, self._original = layers, {}, None
        self.processor = processor or CaptureProcessor

    @property
    def maps(self):
        """Every hooked layer's maps since the last `clear()`, layers in forward order, calls in call order."""
        return [m for slot in self.slots.values() for m in slot.maps]

    def __enter__(self):
        self._original = dict(self.unet.attn_processors)
        cross = cross_attention_processors(self.unet) if self.processor is CaptureProcessor else list(self.layers)
        if self.expected_layers is not None and len(cross) != self.expected_layers:
            raise ValueError(
                f"found {len(cross)} cross-attention (attn2) layers, expected {self.expected_layers} "
                "(the SD 1.x/2.x layout); pass expected_layers=None or the right count for another layout")
        cross = [name for name in cross if self.layers is None or name in self.layers]
        self.slots = {name: LayerMaps() for name in cross}
        processors = {n: self.processor(self.slots[n].record, self.token_indices) for n in cross}
        self.unet.set_attn_processor({n: processors.get(n, p) for n, p in self._original.items()})
        self.layer_count = len(cross)
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(dict(self._original))
        self._original = None
        return False

    def clear(self):
        """Forget the maps of the previous forward passes."""
        for slot in self.slots.values():
            slot.maps.clear()

    @contextmanager
    def paused(self):
        """The stock processors for a while (e.g. sampling a validation grid): nothing is recorded."""
        capturing = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(dict(self._original))
        try:
            yield self
        finally:
            self.unet.set_attn_processor(capturing)


def compile_with_capture(module, **compile_kwargs):
    """torch.compile `module` in place (the whole U-Net as one graph, or one of its blocks; module names,
    processors and state-dict keys stay) with the capture inside. The capture's `record` is a side effect,
    which dynamo refuses inside gradient checkpointing (eager checkpointing replays it in backward) and would
    split the graph at every checkpointed block; the capture wants each map recorded once (see `in_backward`),
    which is what this dynamo switch does. Before torch has the switch, checkpointed blocks just run in
    smaller graphs."""
    import torch._dynamo.config as dynamo_config
    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    module.compile(**compile_kwargs)
    return module


def attention_reg_terms(maps, reduction="per_layer"):
    """Unweighted (mean term, variance term) of Eq. 2; column 0 = [V], column 1 = category."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not maps:
        raise ValueError("no attention maps were captured: run the U-Net inside CrossAttentionCapture")
    # Each map: (B, heads, HW, 2) -> [V] and category values per sample, (B, heads*HW).
    v = [m[..., 0].float().flatten(1) for m in maps]
    c = [m[..., 1].float().flatten(1) for m in maps]
    if reduction == "per_layer":  # released code: stats per layer and sample, sum over batch, mean over layers
        mean_term = torch.stack([((vi.mean(1) - ci.mean(1)) ** 2).sum() for vi, ci in zip(v, c)]).mean()
        var_term = torch.stack([((vi.var(1) - ci.var(1)) ** 2).sum() for vi, ci in zip(v, c)]).mean()
        return mean_term, var_term
    v, c = torch.cat(v, dim=1), torch.cat(c, dim=1)  # paper: all values of all layers pooled per sample
    return ((v.mean(1) - c.mean(1)) ** 2).mean(), ((v.var(1) - c.var(1)) ** 2).mean()


def attention_reg_loss(maps, mean_weight, var_weight, reduction="per_layer", with_terms=False):
    """Eq. 2: mean_weight * (mu(M_V) - mu(M_cat))^2 + var_weight * (var(M_V) - var(M_cat))^2; with
    `with_terms`, (loss, mean term, var term), so a caller logging the terms computes them once."""
    mean_term, var_term = attention_reg_terms(maps, reduction)
    loss = mean_weight * mean_term + var_weight * var_term
    return (loss, mean_term, var_term) if with_terms else loss
