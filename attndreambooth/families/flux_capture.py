"""FLUX.1's attention with [V]'s map recorded: diffusers' FluxAttnProcessor, its output unchanged, plus the
probabilities of the image queries at chosen text-key columns (families/joint_maps.py computes them without
the probability matrix; the fused attention still makes the output).

FLUX.1 orders the joint sequence [text (T5 tokens), image]. A double-stream block gets the text separately
(`encoder_hidden_states`); a single-stream block gets the sequence already joined, so the processor is told the
text length. The output path is the stock processor's, line for line (diffusers 0.42; tests/test_joint_maps.py
compares the two outputs), so a diffusers change that breaks it shows there.
"""
import torch
from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb, dispatch_attention_fn

from attention_reg import in_backward
from attndreambooth.families.joint_maps import joint_columns


class FluxCaptureProcessor:
    """`record(maps)` gets (B, heads, image tokens, len(columns)) per call; `renormalise_text`: the columns
    renormalised over the text keys (a text-only softmax) rather than over text and image keys together."""

    def __init__(self, record, columns, text_len, renormalise_text=False):
        self.record, self.columns, self.text_len = record, list(columns), text_len
        self.renormalise_text = renormalise_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (t.unflatten(-1, (-1, attn.head_dim))
                                                         for t in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.text_len
        if not in_backward():  # a checkpoint recomputation runs the same ops but adds no maps
            q_image, k_all = query[:, text:].transpose(1, 2), key.transpose(1, 2)  # (B, heads, tokens, head_dim)
            self.record(joint_columns(q_image, k_all, self.columns, attn.head_dim ** -0.5,
                                      renormalise_over=text if self.renormalise_text else None))

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())
