"""SD3 / SD3.5's attention with [V]'s map recorded: diffusers' JointAttnProcessor2_0, its output unchanged,
plus the probabilities of the image queries at chosen text-key columns (families/joint_maps.py).

SD3 orders the joint sequence [image, text] (the text: CLIP-L and CLIP-G's 77 tokens, then T5's). For the
maps the keys are put text first, so a column is a text token's position and "renormalised over the text keys"
is over the first keys; a softmax does not depend on the order of its keys. SD3.5-Medium's extra image-only
attention (no text) records nothing. The output path is the stock processor's (diffusers 0.42;
tests/test_joint_maps.py compares the two outputs).
"""
import torch
import torch.nn.functional as F

from attention_reg import in_backward
from attndreambooth.families.joint_maps import joint_columns


class SD3CaptureProcessor:
    """`record(maps)` gets (B, heads, image tokens, len(columns)) per joint block; `renormalise_text`: the
    columns renormalised over the text keys rather than over text and image keys together."""

    def __init__(self, record, columns, renormalise_text=False):
        self.record, self.columns, self.renormalise_text = record, list(columns), renormalise_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image = hidden_states.shape[0], hidden_states.shape[1]
        split = lambda t: t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        query, key, value = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            e_query, e_key, e_value = split(attn.add_q_proj(e)), split(attn.add_k_proj(e)), split(attn.add_v_proj(e))
            if attn.norm_added_q is not None:
                e_query = attn.norm_added_q(e_query)
            if attn.norm_added_k is not None:
                e_key = attn.norm_added_k(e_key)
            if not in_backward():  # a checkpoint recomputation runs the same ops but adds no maps
                text_first = torch.cat([e_key, key], dim=2)
                self.record(joint_columns(query, text_first, self.columns, query.shape[-1] ** -0.5,
                                          renormalise_over=e.shape[1] if self.renormalise_text else None))
            query, key, value = (torch.cat(p, dim=2) for p in ((query, e_query), (key, e_key), (value, e_value)))

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_out = out[:, :image], out[:, image:]
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, encoder_out) if encoder_hidden_states is not None else out
