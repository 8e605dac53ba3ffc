"""Columns of a joint attention's softmax (the MMDiT families' maps for Eq. 2), against the explicit softmax:
values and gradients, over all keys and renormalised over the text keys, with chunks smaller than the keys."""
import pytest
import torch

from attndreambooth.families.joint_maps import joint_columns


def explicit(q, k, columns, scale, n=None):
    s = (q @ k.transpose(-1, -2)) * scale
    norm = s if n is None else s[..., :n]
    return (s[..., columns] - torch.logsumexp(norm, dim=-1, keepdim=True)).exp()


@pytest.mark.parametrize("renormalise", [None, 5])
@pytest.mark.parametrize("columns", [[2, 4], [0], [3, 3, 6], [9]])
def test_columns_and_their_gradients_match_the_explicit_softmax(renormalise, columns):
    if renormalise is not None and max(columns) >= 10:
        pytest.skip("no such key")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 7, len(columns), generator=g, dtype=torch.float64)
    got = joint_columns(q, k, columns, 0.5, renormalise_over=renormalise, chunk=3)
    want = explicit(q, k, columns, 0.5, renormalise)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    dq, dk = torch.autograd.grad((got.double() * weight).sum(), (q, k))
    wq, wk = torch.autograd.grad((want * weight).sum(), (q, k))
    torch.testing.assert_close(dq, wq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dk, wk, rtol=1e-4, atol=1e-6)


def test_a_full_row_of_columns_sums_to_one_and_renormalised_text_columns_too():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    every = joint_columns(q, k, list(range(12)), 8 ** -0.5, chunk=5)
    torch.testing.assert_close(every.sum(-1), torch.ones(1, 2, 5))
    text = joint_columns(q, k, list(range(4)), 8 ** -0.5, renormalise_over=4, chunk=5)
    torch.testing.assert_close(text.sum(-1), torch.ones(1, 2, 5))
    assert (text > every[..., :4]).all()  # the image keys take their share from every text column


def tiny_flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                   axes_dims_rope=(2, 2, 4)).eval()
    side, text = 4, 6
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                           indexing="ij"),
                            -1).reshape(-1, 3)
    inputs = dict(hidden_states=torch.randn(1, side * side, 4), encoder_hidden_states=torch.randn(1, text, 16),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]), img_ids=image_ids,
                  txt_ids=torch.zeros(text, 3))
    return model, inputs, text


class ExplicitFlux:
    """FLUX.1's attention written out with an explicit softmax: the test's own path to the probabilities."""

    def __init__(self, text_len):
        self.text_len, self.probs = text_len, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_flux import apply_rotary_emb
        split = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = split(attn.add_q_proj(e)), split(attn.add_k_proj(e)), split(attn.add_v_proj(e))
            q, k, v = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1), torch.cat([ev, v], 1)
        q, k = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1), apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        self.probs.append(probs)
        out = (probs @ v).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, text:])), attn.to_add_out(out[:, :text])


def test_flux_capture_keeps_the_output_and_records_the_explicit_softmax_columns():
    """Both block kinds of a tiny FLUX.1 transformer: the capture's output is the stock processor's, and its
    columns (joint, and renormalised over the text keys) are the explicit softmax's, which itself reproduces
    the stock output."""
    from attndreambooth.families.flux_capture import FluxCaptureProcessor
    model, inputs, text = tiny_flux()
    with torch.no_grad():
        stock = model(**inputs).sample
        explicit = ExplicitFlux(text)
        model.set_attn_processor(explicit)
        torch.testing.assert_close(model(**inputs).sample, stock, rtol=1e-4, atol=1e-5)
        for renormalise in (False, True):
            maps = []
            model.set_attn_processor(FluxCaptureProcessor(maps.append, [1, 3], text, renormalise_text=renormalise))
            torch.testing.assert_close(model(**inputs).sample, stock, rtol=1e-5, atol=1e-6)
            assert len(maps) == 2  # one double-stream block, one single-stream block
            for got, probs in zip(maps, explicit.probs):
                image_rows = probs[:, :, text:]
                want = image_rows[..., [1, 3]]
                if renormalise:
                    want = want / image_rows[..., :text].sum(-1, keepdim=True)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class ExplicitSD3:
    """SD3's joint attention written out with an explicit softmax over [image, text] keys."""

    def __init__(self):
        self.probs = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        split = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q) if attn.norm_q else q, attn.norm_k(k) if attn.norm_k else k
        image = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = split(attn.add_q_proj(e)), split(attn.add_k_proj(e)), split(attn.add_v_proj(e))
            eq, ek = attn.norm_added_q(eq) if attn.norm_added_q else eq, attn.norm_added_k(ek) if attn.norm_added_k else ek
            q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        if encoder_hidden_states is not None:
            self.probs.append(probs)
        out = (probs @ v).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, enc = out[:, :image], out[:, image:]
        enc = enc if attn.context_pre_only else attn.to_add_out(enc)
        return attn.to_out[1](attn.to_out[0](out)), enc


def test_sd3_capture_keeps_the_output_and_records_the_explicit_softmax_columns():
    """A tiny SD3.5-shaped transformer (a dual-attention block with image-only attention, QK norm, the last
    block context-pre-only): the stock output is kept, and the text columns are the explicit softmax's."""
    from diffusers import SD3Transformer2DModel

    from attndreambooth.families.sd3_capture import SD3CaptureProcessor
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    text = 5
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, text, 16),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([500]))
    with torch.no_grad():
        stock = model(**inputs).sample
        explicit = ExplicitSD3()
        model.set_attn_processor(explicit)
        torch.testing.assert_close(model(**inputs).sample, stock, rtol=1e-4, atol=1e-5)
        for renormalise in (False, True):
            maps = []
            model.set_attn_processor(SD3CaptureProcessor(maps.append, [0, 2], renormalise_text=renormalise))
            torch.testing.assert_close(model(**inputs).sample, stock, rtol=1e-5, atol=1e-6)
            assert len(maps) == 2  # the joint attention of each block; the image-only one records nothing
            for got, probs in zip(maps, explicit.probs):
                image = probs.shape[2] - text
                rows = probs[:, :, :image]
                want = rows[..., [image + 0, image + 2]]
                if renormalise:
                    want = want / rows[..., image:].sum(-1, keepdim=True)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
