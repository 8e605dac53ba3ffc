"""The activation memory of a training step by accounting, not by a fitted factor: a forward on the meta device
(shapes only, no weights) with autograd's saved-tensor hooks counting the bytes kept for the backward, once per
storage, parameters left out. Used for the transformer families (FLUX.1, SD3), where no GPU measurement exists
to fit a factor to (trainer/memory.py); a counted byte is a byte the backward needs, so what it leaves out is
only what lives and dies inside one operation and the allocator's slack.

Two things differ from a GPU run and are set here: attention is counted as the fused kernels keep it (queries,
keys, values, output and one fp32 log-sum-exp per query row; the meta device would otherwise take the math path,
which keeps the whole probability matrix), and the model runs in the dtype its activations have in training.
"""
from contextlib import ExitStack, contextmanager

import torch


class _FusedAttention(torch.autograd.Function):
    """What flash and memory-efficient attention keep for their backward, with an output of the right shape."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the accounting stops after the forward
        raise RuntimeError("the saved-tensor accounting runs forwards only")


@contextmanager
def fused_attention():
    """torch's scaled_dot_product_attention counted as the fused kernels keep it (read at call time by diffusers)."""
    stock = torch.nn.functional.scaled_dot_product_attention
    def counted(query, key, value, *args, **kwargs):  # diffusers passes them by name
        return _FusedAttention.apply(query, key, value)
    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = stock


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@torch.enable_grad()
def saved_bytes(model, call, blocks=()):
    """Bytes autograd keeps from `call()`, a forward through `model` on the meta device, each storage counted once
    and `model`'s parameters not at all. Returns a dict: `total` (the whole forward's) and `checkpointed` (the
    same with each of `blocks` under gradient checkpointing: its inputs kept instead of its insides, plus the
    most one block keeps, which the backward re-makes one block at a time)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    counted, inside, current, inputs = {}, {}, [None], {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in counted:
            counted[storage._cdata] = storage.nbytes()
            inside.setdefault(current[0], 0)
            inside[current[0]] += storage.nbytes()
        return t

    def enter(index):
        def hook(module, args, kwargs):
            current[0] = index
            for t in _tensors((args, kwargs)):
                inputs.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
        return hook

    def leave(module, args, output):
        current[0] = None

    handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(enter(i), with_kwargs=True),
                                                         b.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention():
            call()
    finally:
        for h in handles:
            h.remove()
    total = sum(counted.values())
    per_block = [inside.get(i, 0) for i in range(len(blocks))]
    outside = inside.get(None, 0)
    return dict(total=total, checkpointed=outside + sum(inputs.values()) + max(per_block, default=0))


@contextmanager
def as_trained(model, dtype, trains):
    """`model` (on the meta device) in `dtype` with the 2-D weights `trains(name)` picks requiring gradients (a
    LoRA adapter keeps its layer's input as a trained weight does); put back as found afterwards."""
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    torch.nn.Module.to(model, dtype)  # diffusers' own .to warns about modules kept in fp32: there are none
    for n, p in model.named_parameters():
        p.requires_grad_(p.dim() == 2 and trains(n))
    try:
        yield model
    finally:
        for n, p in model.named_parameters():
            p.data = p.data.to(before[n][0])
            p.requires_grad_(before[n][1])


def denoiser_step(family, denoiser, side, dtype, trains):
    """saved_bytes of one sample's training forward through the denoiser at a `side`-wide latent, the text
    conditioning requiring gradients (stage 1's [V] reaches every block through it)."""
    def call():
        x = torch.zeros(1, family.latent_channels(denoiser), side, side, device="meta", dtype=dtype,
                        requires_grad=True)
        with torch.device("meta"):
            cond = family.shape_inputs(denoiser, side)
        cond.hidden = cond.hidden.to(dtype).requires_grad_()
        cond.extra = {k: v.to(dtype) for k, v in cond.extra.items()}
        family.predict(denoiser, x, torch.zeros(1, device="meta"), cond)
    with as_trained(denoiser, dtype, trains):
        return saved_bytes(denoiser, call, family.checkpointed_blocks(denoiser))


def text_step(family, text_encoders, dtype):
    """saved_bytes of the one prompt's forward through the text encoders with [V]'s rows trained (stage 1: the
    prompt is encoded once a step, whatever the batch)."""
    def call():  # (a transformer family's lengths are its pipeline's, whatever the tokenizers)
        family.encode(text_encoders, [torch.zeros(1, n, dtype=torch.long, device="meta")
                                      for n in family.token_lengths(())])
    with ExitStack() as stack:
        for e in text_encoders:
            rows = {n for n, p in e.named_parameters() if p is e.get_input_embeddings().weight}
            stack.enter_context(as_trained(e, dtype, rows.__contains__))
        return saved_bytes(torch.nn.ModuleList(text_encoders), call)
