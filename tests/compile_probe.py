"""Helper for test_compile.py, run as its own process: the tiny U-Net with the capture, eager and then
compiled as `runtime.compile` says (argv: mode, backend, cache folder[, warm]), the loss and gradients of a
step of each stage in both, and what dynamo and inductor did; prints one JSON line (warm: the compiled steps
alone, and the counts)."""
import contextlib
import json
import sys

import torch

from attention_reg import CrossAttentionCapture, attention_reg_loss
from attndreambooth.families.source import tiny_model_dir
from attndreambooth.trainer.compiling import compile_counts, compile_unet, use_cache

mode, backend, cache = sys.argv[1:4]
warm = sys.argv[4:] == ["warm"]  # a second process: only the compiled steps, for what the cache did
use_cache(cache, torch.device("cpu"))
from diffusers import UNet2DConditionModel  # noqa: E402

unet = UNet2DConditionModel.from_pretrained(tiny_model_dir("tiny"), subfolder="unet")
unet.train()
g = torch.Generator().manual_seed(0)
x, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
# stage 3: every weight trains. Stage 1's pattern (the gradient stops at the text) and stage 2's (attn2 alone) are
# traced with aot_eager (what inductor compiles, without minutes of code generation) by test_compile's
# SD-proportioned test and test_attention_reg's compile test
STAGES = {"stage3": lambda n: True}


def step(cap, trains, profile=False):
    unet.requires_grad_(False)
    for n, p in unet.named_parameters():
        p.requires_grad_(trains is not None and trains(n))
    text = cond.clone().requires_grad_(trains is None)
    unet.zero_grad(set_to_none=True)
    cap.clear()
    with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
        out = unet(x, t, text).sample
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) if profile else None
    loss = attention_reg_loss(cap.maps, 2.0, 5.0) * 1e4 + out.square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    if trains is None:
        grads = {"text": text.grad}
    return loss.item(), grads, len(cap.maps), ops


if warm:
    with CrossAttentionCapture(unet, [5, 6]) as cap:
        compile_unet(unet, mode, backend=backend)
        for f in STAGES.values():
            step(cap, f)
    print(json.dumps(compile_counts()))
    sys.exit(0)
with CrossAttentionCapture(unet, [5, 6]) as cap:
    eager = {s: step(cap, f, profile=True) for s, f in STAGES.items()}
    compile_unet(unet, mode, backend=backend)
    compiled = {s: step(cap, f) for s, f in STAGES.items()}
    again = {s: step(cap, f, profile=True) for s, f in STAGES.items()}  # compiled already: no new compilation
result = dict(compile_counts(), layers=cap.layer_count)
for s in STAGES:
    (el, eg, en, eager_ops), (cl, cg, cn, _) = eager[s], compiled[s]
    result[s] = dict(loss_diff=abs(el - cl) / abs(el), grads=sorted(eg) == sorted(cg), maps=[en, cn],
                     ops=[eager_ops, again[s][3]], again_same=again[s][0] == cl,
                     grad_diff=max(((eg[n] - cg[n]).abs().max() / eg[n].abs().max().clamp_min(1e-5)).item() for n in eg))
    # (a floor of 1e-5: the mid block's self-attention over its single pixel has gradients of rounding noise)
print(json.dumps(result))
