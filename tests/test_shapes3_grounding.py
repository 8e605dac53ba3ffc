"""The third world's optional grounding term: its schedule and loss by hand, its gradient reaching the U-Net
through the capture, and when a run may be given it."""
import pytest
import torch

from worlds.shapes3.grounding import grounding_loss, grounding_weight


def test_the_weight_is_on_from_its_step_and_falls_to_zero_by_until():
    w = [grounding_weight(s, 0.5, 10, 30, 10) for s in (0, 9, 10, 19, 20, 25, 29, 30, 40)]
    assert w == [0.0, 0.0, 0.5, 0.5, 0.5, 0.25, 0.05, 0.0, 0.0]
    assert grounding_weight(15, 0.0, 10, 30, 10) == 0.0


def test_the_loss_by_hand():
    """Two captions, a 16x16 and a 4x4 layer (skipped: coarser than MIN_SIDE): caption 0 names a main object
    (token 2) and a second (token 5), caption 1 only a main object (token 3); one head's map all on the object
    and the other's uniform."""
    masks = torch.zeros(2, 2, 64, 64)
    masks[0, 0, :32, :32] = 1  # the top-left quarter
    masks[0, 1, 32:, 32:] = 1
    masks[1, 0, :, :16] = 1  # the left quarter
    which = torch.full((2, 77), -100)
    which[0, 2], which[0, 5], which[1, 3] = 0, 1, 0
    fine = torch.full((2, 2, 256, 77), 1 / 77)
    on = torch.zeros(2, 16, 16)
    on[0, :8, :8] = 1
    on[1, :, :4] = 1
    fine[:, 0, :, 2] = 0
    fine[0, 0, :, 2] = on[0].flatten() / 64
    fine[1, 0, :, 3] = on[1].flatten() / 64
    coarse = torch.rand(2, 2, 16, 77)
    got = grounding_loss([fine, coarse], which, masks)
    # the heads' maps are averaged, then the share inside taken: head 0 puts its mass 1 inside, head 1 spreads
    # 256/77 evenly, 64/77 of it inside; the second word is uniform in both heads (a quarter inside)
    main = (1 + 64 / 77) / (1 + 256 / 77)
    inside = [main, main, 0.25]
    want = sum((1 - x) ** 2 for x in inside) / 3
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert grounding_loss([coarse], which, masks).item() == 0.0  # no layer fine enough: no term


def test_its_gradient_pulls_the_words_attention_onto_the_object():
    """Four Adam steps on the term alone, through the capture on the third world's U-Net: the attention the
    main noun puts on its object grows."""
    from diffusers import UNet2DConditionModel

    from attention_reg import CrossAttentionCapture
    from worlds.shapes3.model import UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).train()
    x, t, cond = torch.randn(2, 8, 16, 16), torch.tensor([300, 700]), torch.randn(2, 77, 128)
    which = torch.full((2, 77), -100)
    which[:, 3] = 0
    masks = torch.zeros(2, 2, 64, 64)
    masks[:, 0, 8:40, 8:40] = 1
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    with CrossAttentionCapture(unet, expected_layers=None) as cap:
        for _ in range(4):
            cap.clear()
            unet(x, t, cond)
            loss = grounding_loss(cap.maps, which, masks)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_a_run_may_be_given_grounding_before_it_begins_and_not_after(tmp_path):
    from test_shapes3 import _run
    run = _run(tmp_path)
    state = dict(phase="unet", step=5, args=dict(run.state_dict()["args"]))
    for k in ("grounding", "grounding_from", "grounding_until", "grounding_anneal"):
        del state["args"][k]  # made before the options existed
    later = dict(grounding=0.05, grounding_from=8, grounding_until=20, grounding_anneal=4)
    assert _run(tmp_path, **later).changed_options(state) == []
    assert _run(tmp_path, **dict(later, grounding_from=3)).changed_options(state) == ["grounding", "grounding_from",
                                                                                        "grounding_until",
                                                                                        "grounding_anneal"]
    begun = dict(state, step=10, args=dict(state["args"], **later))
    assert _run(tmp_path, **later).changed_options(begun) == []  # the same options continue
    assert _run(tmp_path, **dict(later, grounding=0.1)).changed_options(begun) == ["grounding"]
    assert _run(tmp_path, **dict(later, grounding_from=12)).changed_options(dict(begun, step=7)) == []


def test_a_pretraining_step_adds_the_term_only_where_its_weight_is_on(tmp_path, monkeypatch, deterministic):
    """The same U-Net step of the same run with the term off, on from a later step (no effect yet), and on:
    the first two give the same weights bitwise (deterministic kernels, as the pretraining runs), the third
    others."""
    from test_shapes3 import _run
    from worlds.shapes3 import pretrain
    monkeypatch.setattr(pretrain.Pretraining, "normalise_latents", lambda self: None)
    after = {}
    for name, kw in (("off", {}), ("later", dict(grounding=5.0, grounding_from=1, grounding_until=3,
                                                   grounding_anneal=1)),
                     ("on", dict(grounding=5.0, grounding_from=0, grounding_until=3, grounding_anneal=1))):
        torch.manual_seed(0)
        run = _run(tmp_path, name=f"{name}.pt", **kw)
        while run.phase != "unet":
            getattr(run, f"{run.phase}_step")()
        run.unet_step()
        after[name] = [p.detach().clone() for p in run.unet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after["off"], after["later"]))
    assert not all(torch.equal(a, b) for a, b in zip(after["off"], after["on"]))
