"""A few columns of a joint attention's probabilities, exactly, without the full probability matrix.

In an MMDiT block (FLUX.1, SD3) every image query's softmax runs over the text and image keys together, and a
fused kernel never forms the probabilities. Eq. 2 needs only [V]'s and the category's columns:

    p_ij = exp(s_ij - LSE_i),   s_ij = q_i . k_j * scale,   LSE_i = log sum_l exp(s_il)  (over all keys l)

`joint_columns` computes those columns with the log-sum-exp taken over the keys in chunks, and its backward
recomputes each chunk of the softmax (as flash attention does), so memory grows with queries x chunk, not
queries x keys. With `renormalise_over` the columns are renormalised over the first `n` keys instead (the text
keys, when the text comes first): the map [V] would have in a text-only softmax, the choice that TACA
(arXiv 2506.07986) argues for, since the image keys outnumber the text keys and shrink every text column.

Gradient of a column entry: dp_ij/ds_il = p_ij (1[l = j] - p_il), so with G the loss's gradient on the
chosen columns and r_i = sum_j G_ij p_ij, dL/ds_il = p_il (G_il 1[l chosen] - r_i) for every key l.
"""
import torch

CHUNK = 1024  # keys per chunk of the log-sum-exp and of the backward's recomputation


def _lse(q, k, scale, chunk):
    """log sum_l exp(q . k_l * scale) over every key, (B, H, N), in fp32, a chunk of keys at a time."""
    parts = [torch.logsumexp((q @ k[..., i:i + chunk, :].transpose(-1, -2)).float() * scale, dim=-1)
             for i in range(0, k.shape[-2], chunk)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


class _JointColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, columns, scale, keys, chunk):
        lse = _lse(q, k[..., :keys, :], scale, chunk)
        picked = ((q @ k[..., columns, :].transpose(-1, -2)).float() * scale - lse[..., None]).exp()
        ctx.save_for_backward(q, k, columns, lse, picked)
        ctx.scale, ctx.keys, ctx.chunk = scale, keys, chunk
        return picked

    @staticmethod
    def backward(ctx, grad):
        q, k, columns, lse, picked = ctx.saved_tensors
        scale, keys, chunk = ctx.scale, ctx.keys, ctx.chunk
        grad = grad.float()
        r = (grad * picked).sum(-1, keepdim=True)  # (B, H, N, 1)
        dq, dk = torch.zeros_like(q, dtype=torch.float32), torch.zeros_like(k, dtype=torch.float32)
        for i in range(0, keys, chunk):
            kc = k[..., i:min(i + chunk, keys), :].float()
            p = ((q.float() @ kc.transpose(-1, -2)) * scale - lse[..., None]).exp()  # (B, H, N, c)
            g = torch.zeros_like(p)
            inside = (columns >= i) & (columns < i + kc.shape[-2])  # chosen, in this chunk
            if inside.any():  # index_add: a column chosen twice gets both gradients
                g.index_add_(-1, columns[inside] - i, grad[..., inside])
            ds = p * (g - r) * scale
            dq += ds @ kc
            dk[..., i:i + kc.shape[-2], :] = ds.transpose(-1, -2) @ q.float()
        outside = columns >= keys  # a chosen column outside the normalising keys (renormalise_over)
        if outside.any():
            ds = (picked[..., outside] * grad[..., outside]) * scale  # d exp(s - lse)/ds = p, lse independent
            dq += ds @ k[..., columns[outside], :].float()
            dk[..., columns[outside], :] += ds.transpose(-1, -2) @ q.float()
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None


def joint_columns(q, k, columns, scale, renormalise_over=None, chunk=CHUNK):
    """Softmax probabilities p[..., i, j] of queries `q` (B, H, N, d) over keys `k` (B, H, M, d) at the key
    positions `columns` (a list), shape (B, H, N, len(columns)), fp32, differentiable in q and k. The softmax
    runs over all M keys, or over the first `renormalise_over` of them."""
    keys = k.shape[-2] if renormalise_over is None else renormalise_over
    index = torch.as_tensor(columns, dtype=torch.long, device=k.device)
    return _JointColumns.apply(q, k, index, float(scale), keys, chunk)
