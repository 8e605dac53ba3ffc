"""attention_reg.py against docs/method.md: Eq. 2's two reductions and the capture hook."""
import statistics
import types

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from attention_reg import CaptureProcessor, CrossAttentionCapture, attention_reg_loss, attention_reg_terms
from attndreambooth.config.schema import RegConfig


def hand_maps():
    """Two layers, batch 2; values chosen so every mean and variance is worked out by hand below."""
    # layer A: (B=2, heads=1, HW=2, 2 columns [V, category])
    a = torch.tensor([[[[0.1, 0.2], [0.3, 0.2]]], [[[0.5, 0.1], [0.5, 0.3]]]])
    # layer B: (B=2, heads=2, HW=1, 2)
    b = torch.tensor([[[[0.0, 0.2]], [[0.4, 0.2]]], [[[0.1, 0.1]], [[0.1, 0.1]]]])
    return [a, b]


def test_per_layer_reduction_by_hand():
    # Layer A: sample 0 d_mean 0, d_var 0.02 - 0; sample 1 d_mean 0.5 - 0.2 = 0.3, d_var 0 - 0.02.
    # Layer B: sample 0 d_mean 0, d_var 0.08 - 0; sample 1 all equal.
    # Sum over the batch, mean over the 2 layers:
    mean_term = (0.3 ** 2 + 0) / 2
    var_term = ((0.02 ** 2 + 0.02 ** 2) + 0.08 ** 2) / 2
    got_mean, got_var = attention_reg_terms(hand_maps(), "per_layer")
    assert got_mean.item() == pytest.approx(0.045)
    assert got_var.item() == pytest.approx(0.0036)
    assert (mean_term, var_term) == pytest.approx((0.045, 0.0036))
    loss = attention_reg_loss(hand_maps(), mean_weight=2.0, var_weight=5.0)
    assert loss.item() == pytest.approx(2 * 0.045 + 5 * 0.0036)


def test_pooled_reduction_by_hand():
    # Sample 0 pools V = [.1 .3 0 .4], C = [.2]*4: d_mean 0, var_V = 0.1/3, var_C = 0.
    # Sample 1 pools V = [.5 .5 .1 .1], C = [.1 .3 .1 .1]: d_mean 0.15, var_V 0.16/3, var_C 0.03/3.
    mean_term = (0 + 0.15 ** 2) / 2
    var_term = ((0.1 / 3) ** 2 + (0.13 / 3) ** 2) / 2
    got_mean, got_var = attention_reg_terms(hand_maps(), "pooled")
    assert got_mean.item() == pytest.approx(mean_term)
    assert got_var.item() == pytest.approx(var_term)
    loss = attention_reg_loss(hand_maps(), 0.1, 0.0, reduction="pooled")
    assert loss.item() == pytest.approx(0.1 * mean_term)


@pytest.mark.parametrize("reduction", ["per_layer", "pooled"])
def test_random_maps_against_statistics_module(reduction):
    g = torch.Generator().manual_seed(1)
    maps = [torch.rand(3, 2, hw, 2, generator=g, dtype=torch.float64) for hw in (16, 4, 1)]
    columns = lambda m, s, j: m[s, :, :, j].flatten().tolist()  # noqa: E731
    if reduction == "per_layer":
        per_layer = []
        for m in maps:
            per_layer.append([sum((statistics.mean(columns(m, s, 0)) - statistics.mean(columns(m, s, 1))) ** 2
                                  for s in range(3)),
                              sum((statistics.variance(columns(m, s, 0)) - statistics.variance(columns(m, s, 1))) ** 2
                                  for s in range(3))])
        want = [statistics.mean(x[i] for x in per_layer) for i in (0, 1)]
    else:
        pooled = [([v for m in maps for v in columns(m, s, 0)], [v for m in maps for v in columns(m, s, 1)])
                  for s in range(3)]
        want = [statistics.mean((statistics.mean(v) - statistics.mean(c)) ** 2 for v, c in pooled),
                statistics.mean((statistics.variance(v) - statistics.variance(c)) ** 2 for v, c in pooled)]
    got = attention_reg_terms(maps, reduction)
    assert [x.item() for x in got] == pytest.approx(want, rel=1e-5)  # the loss computes in fp32


def test_gradient_reaches_both_columns():
    maps = [m.clone().requires_grad_(True) for m in hand_maps()]
    attention_reg_loss(maps, 2.0, 5.0).backward()
    assert maps[0].grad[..., 0].abs().sum() > 0 and maps[0].grad[..., 1].abs().sum() > 0  # category not detached


def test_bad_reduction_and_empty_maps():
    with pytest.raises(ValueError, match="reduction"):
        attention_reg_terms(hand_maps(), "mean")
    with pytest.raises(ValueError, match="no attention maps"):
        attention_reg_terms([], "per_layer")


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g))


def reference_probs(unet):
    """softmax(Q K^T * d^-0.5) of every attn2 layer, computed from the layers' inputs by forward hooks."""
    probs, handles = [], []

    def hook(attn, args, kwargs):
        h, e = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        q, k = attn.to_q(h), attn.to_k(e)
        d = q.shape[-1] // attn.heads
        q = q.view(q.shape[0], -1, attn.heads, d).transpose(1, 2)
        k = k.view(k.shape[0], -1, attn.heads, d).transpose(1, 2)
        probs.append(torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1))

    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return probs, handles


def test_capture_keeps_output_and_records_true_probabilities(tiny_pipe):
    unet = tiny_pipe.unet
    x, t, cond = unet_inputs(unet)
    with torch.no_grad():
        stock = unet(x, t, cond).sample
        probs, handles = reference_probs(unet)
        with CrossAttentionCapture(unet, token_indices=[5, 6]) as cap:
            hooked = unet(x, t, cond).sample
        for h in handles:
            h.remove()
        with CrossAttentionCapture(unet) as cap_all:
            unet(x, t, cond)
    torch.testing.assert_close(hooked, stock, atol=1e-5, rtol=1e-5)
    assert len(cap.maps) == len(cap_all.maps) == len(probs) == 16
    for got, full, ref in zip(cap.maps, cap_all.maps, probs):
        assert got.shape == (*ref.shape[:3], 2)  # only the two requested columns are kept
        torch.testing.assert_close(got, ref[..., [5, 6]], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(full, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(full.sum(-1), torch.ones_like(full[..., 0]))


def test_processors_restored_after_exit_and_exception(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with CrossAttentionCapture(unet, [5, 6]):
        now = unet.attn_processors
        assert all(isinstance(p, CaptureProcessor) == (".attn2." in n) for n, p in now.items())
        assert all(isinstance(p, AttnProcessor2_0) for n, p in now.items() if ".attn1." in n)  # SDPA kept
    assert all(unet.attn_processors[n] is p for n, p in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with CrossAttentionCapture(unet, [5, 6]):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_sd21_layout_has_16_cross_attention_layers():
    from attndreambooth.families.sd import sd_layout
    unet, _ = sd_layout("meta")
    with CrossAttentionCapture(unet, [5, 6]) as cap:
        assert cap.layer_count == 16
    with pytest.raises(ValueError, match="found 16 cross-attention"):
        with CrossAttentionCapture(unet, [5, 6], expected_layers=12):
            pass


def test_capture_under_bf16_autocast(tiny_pipe):
    unet = tiny_pipe.unet
    x, t, cond = unet_inputs(unet)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stock = unet(x, t, cond).sample.float()
        with CrossAttentionCapture(unet, [5, 6]) as cap:
            hooked = unet(x, t, cond).sample.float()
    assert (hooked - stock).abs().max() / stock.abs().max() < 3e-2
    assert all(m.dtype == torch.float32 for m in cap.maps)


def test_gradient_checkpointing_records_once_and_gives_same_gradients(tiny_pipe):
    unet = tiny_pipe.unet
    unet.train()
    x, t, cond = unet_inputs(unet)
    params = [p for n, p in unet.named_parameters() if ".attn2.to_k" in n]

    def grads(checkpointing):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        unet.zero_grad(set_to_none=True)
        with CrossAttentionCapture(unet, [5, 6]) as cap:
            out = unet(x, t, cond).sample
            loss = attention_reg_loss(cap.maps, 2.0, 5.0) * 1e6 + out.square().mean()
            loss.backward()
            assert len(cap.maps) == 16  # recomputation in backward added nothing
        return [p.grad.clone() for p in params]

    plain, ckpt = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain)  # the graph through the maps is kept
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model, layers", [("tiny", 16), ("tiny-sdxl", 17)])
def test_compiled_unet_is_one_graph_with_the_capture_inside(model, layers):
    """torch.compile with the capture and gradient checkpointing (the low-memory preset): one graph, no
    graph break (a break per attn2 layer made dynamo hit its recompile limit and run the U-Net eagerly),
    each map recorded once, and the eager step's loss and gradients; on SDXL's layout too (its pooled text and
    size/crop inputs). `aot_eager` traces exactly what inductor would compile, without a C++ or CUDA compiler."""
    import torch._dynamo
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    from attention_reg import compile_with_capture
    from attndreambooth.families import of_tiny
    from attndreambooth.families.source import tiny_model_dir
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir(model), subfolder="unet")
    unet.train()
    unet.enable_gradient_checkpointing()
    x, t, cond = unet_inputs(unet)
    extra = of_tiny(model).placeholder_inputs(unet, len(x))  # {} for SD; for SDXL a pooled embedding and size/crop ids
    for value in extra.get("added_cond_kwargs", {}).values():
        value.normal_(generator=torch.Generator().manual_seed(1))
    params = [p for n, p in unet.named_parameters() if ".attn2." in n]
    unet.requires_grad_(False)  # stage 2's pattern: the cross-attention layers alone train
    for p in params:
        p.requires_grad_(True)

    def step(cap):
        cap.clear()
        unet.zero_grad(set_to_none=True)
        out = unet(x, t, cond, **extra).sample
        loss = attention_reg_loss(cap.maps, 2.0, 5.0) * 1e6 + out.square().mean()
        loss.backward()
        return loss.item(), len(cap.maps), [p.grad.clone() for p in params]

    torch._dynamo.reset()
    counters.clear()
    with CrossAttentionCapture(unet, [5, 6], expected_layers=layers) as cap:
        # torch 2.11's dynamo breaks the graph on a bound builtin (list.append): recording must be Python code
        processor = next(p for n, p in unet.attn_processors.items() if ".attn2." in n)
        assert not isinstance(processor.record, types.BuiltinMethodType)
        eager_loss, eager_maps, eager_grads = step(cap)
        compile_with_capture(unet, backend="aot_eager")  # the default backend's tracing, without code generation
        results = [step(cap) for _ in range(2)]  # the second call must reuse the graph
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    for loss, n_maps, grads in results:
        assert n_maps == eager_maps == layers
        assert loss == pytest.approx(eager_loss, rel=1e-5)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_layer_factors_are_the_query_grids_and_select_layers(tiny_pipe):
    """Each attn2 layer's factor, read from its name, equals its query grid in a real forward; a map-size
    selection hooks exactly those layers."""
    from attndreambooth.families import by_name
    from attndreambooth.trainer.map_sizes import regularised_layers
    sd = by_name("sd")
    cross_attention_layers = sd.cross_attention_layers
    unet = tiny_pipe.unet
    x, t, cond = unet_inputs(unet)
    factors = cross_attention_layers(unet)
    assert len(factors) == 16
    with torch.no_grad():
        for name, factor in factors.items():
            with CrossAttentionCapture(unet, [5, 6], layers=[name]) as cap:
                unet(x, t, cond)
            assert len(cap.maps) == 1 and cap.maps[0].shape[2] == (x.shape[-1] // factor) ** 2, name
    chosen = regularised_layers(sd, unet, RegConfig(map_sizes=[4, 1]), 8)  # 64 px: latent 8, maps 8, 4, 2, 1 on a side
    with torch.no_grad(), CrossAttentionCapture(unet, [5, 6], layers=chosen) as cap:
        unet(x, t, cond)
    assert sorted(m.shape[2] for m in cap.maps) == [1] + [16] * 5
    with pytest.raises(ValueError, match=r"reg.map_sizes.*\[3\] matches no cross-attention layer.*\[8, 4, 2, 1\]"):
        regularised_layers(sd, unet, RegConfig(map_sizes=[3]), 8)


def test_map_sizes_are_the_sizes_the_unet_makes_when_strides_round_up(tiny_pipe):
    """A latent of odd side (72 px: 9): each stride-2 convolution rounds up (9, 5, 3, 2), and the sizes that
    reg.map_sizes selects and messages name are those a real forward captures."""
    from attndreambooth.families import by_name
    from attndreambooth.trainer.map_sizes import latent_side, map_side, regularised_layers
    sd, unet = by_name("sd"), tiny_pipe.unet
    latent = latent_side(tiny_pipe.vae.config, 72)
    assert latent == 72 // tiny_pipe.vae_scale_factor == 9
    x, t, cond = torch.randn(1, 4, latent, latent), torch.tensor([500]), torch.randn(1, 77, 32)
    captured = {}
    with torch.no_grad():
        for name in sd.cross_attention_layers(unet):
            with CrossAttentionCapture(unet, [5, 6], layers=[name]) as cap:
                unet(x, t, cond)
            captured[name] = cap.maps[0].shape[2]
    assert sorted(set(captured.values())) == [4, 9, 25, 81]  # 2, 3, 5, 9 on a side, not 1, 2, 4, 9
    for name, factor in sd.cross_attention_layers(unet).items():
        assert map_side(latent, factor) ** 2 == captured[name]
    assert set(regularised_layers(sd, unet, RegConfig(map_sizes=[5]), latent)) == {n for n, hw in captured.items() if hw == 25}
    with pytest.raises(ValueError, match=r"a 9x9 latent\) this U-Net's maps are \[9, 5, 3, 2\] on a side"):
        regularised_layers(sd, unet, RegConfig(map_sizes=[4]), latent)


def test_sdxl_layout_has_70_cross_attention_layers_mostly_at_32():
    from diffusers import UNet2DConditionModel

    from attndreambooth.families import by_name
    from attndreambooth.families.sdxl import SDXL_UNET
    from attndreambooth.trainer.map_sizes import regularised_layers
    sdxl = by_name("sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    sides = [128 // f for f in sdxl.cross_attention_layers(unet).values()]  # 1024 px
    assert len(sides) == 70 and sides.count(32) == 60 and sides.count(64) == 10
    assert len(regularised_layers(sdxl, unet, RegConfig(map_sizes=[32]), 128)) == 60
    assert len(regularised_layers(sdxl, unet, RegConfig(map_sizes=None), 128)) == 70
