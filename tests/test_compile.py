"""runtime.compile=regional: the repeated blocks compiled with inductor, the capture inside, no graph
break, one graph per block shape (not per layer), the eager loss and gradients; a second process finds the
kept cache (a counter, not a timer); the SD-proportioned layout traced by aot_eager; the CUDA-graph switch
refused where there is no CUDA."""
import json
import re
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def probe(mode, backend, cache, *warm):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    argv = [sys.executable, str(ROOT / "tests" / "compile_probe.py"), mode, backend, str(cache), *warm]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_regional_compile_equals_eager_and_a_second_process_reuses_its_cache(tmp_path):
    cold = probe("regional", "inductor", tmp_path / "cache")
    assert cold["breaks"] == 0 and cold["cache_misses"] > 0 and cold["cache_hits"] == 0
    assert cold["graphs"] <= 4 < cold["layers"]  # per block shape, not per layer (16 layers)
    r = cold["stage3"]
    assert r["grads"] and r["maps"] == [16, 16] and r["again_same"]
    assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-4, r
    assert r["ops"][1] < 0.8 * r["ops"][0], r  # the compiled blocks ran (past a recompile limit: eager again)
    assert any((tmp_path / "cache").glob(f"torch-{torch.__version__}/cpu/*"))  # under the folder the user keeps
    warm = probe("regional", "inductor", tmp_path / "cache", "warm")
    assert warm["cache_hits"] == cold["cache_misses"] and warm["cache_misses"] == 0  # nothing compiled again


@pytest.mark.slow
def test_sd_proportioned_layout_compiles_regionally_to_the_eager_step():
    """SD 2.1-base's proportions (benchmark.py's `small`: widths / 4, 128 px): aot_eager traces exactly what
    inductor would compile, without the code generation (minutes on 2 cores); stage 3's pattern (every weight
    trains) and stage 1's (the gradient stops at the text), the eager step's loss and gradients."""
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    from attention_reg import CrossAttentionCapture, attention_reg_loss
    from attndreambooth.trainer.compiling import compile_unet
    from bench.layouts import LAYOUTS
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**LAYOUTS["small"]["unet"]).train()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = torch.randn(1, 77, LAYOUTS["small"]["unet"]["cross_attention_dim"])

    def step(cap, stage):
        unet.requires_grad_(stage == "stage3")
        text = cond.clone().requires_grad_(stage == "stage1")
        unet.zero_grad(set_to_none=True)
        cap.clear()
        out = unet(x, t, text).sample
        loss = attention_reg_loss(cap.maps, 2.0, 5.0) * 1e4 + out.square().mean()
        loss.backward()
        return loss.item(), [text.grad] if stage == "stage1" else [p.grad.clone() for p in unet.parameters()]

    torch._dynamo.reset()
    counters.clear()
    with CrossAttentionCapture(unet, [5, 6]) as cap:
        eager = {s: step(cap, s) for s in ("stage3", "stage1")}
        compile_unet(unet, "regional", backend="aot_eager")
        compiled = {s: step(cap, s) for s in ("stage3", "stage1")}
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] <= 8  # <= 4 block shapes, 16 layers, per stage
    for s in eager:
        assert compiled[s][0] == pytest.approx(eager[s][0], rel=1e-5)
        for a, b in zip(compiled[s][1], eager[s][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_the_capturable_step_run_uncaptured_gives_the_loops_weights_bitwise(tmp_path, monkeypatch):
    """runtime.cuda_graph's step (capturable fused AdamW with a tensor lr, the host's image order queued in a
    buffer, autocast without its cache) run uncaptured, as a CPU runs it: the same weights as the loop."""
    from safetensors.torch import load_file

    import train_attndreambooth as T
    from conftest import SAMPLE, tiny_overrides

    import attndreambooth.trainer.preflight as P
    fit = P.fit_memory

    def run(out, graphed):
        def fit_memory(cfg):  # past the config check, which refuses cuda_graph without CUDA
            cfg = fit(cfg)
            cfg.runtime.cuda_graph = graphed
            return cfg
        monkeypatch.setattr(P, "fit_memory", fit_memory)
        T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={SAMPLE}", "runtime.tensorboard=false",
                *tiny_overrides(out)])
        assert ("cuda_graph: true" in (out / "config.yaml").read_text()) == graphed
        files = [out / "learned_embeds.safetensors", *sorted((out / "pipeline" / "unet").glob("*.safetensors"))]
        return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}

    loop, graphed = run(tmp_path / "loop", False), run(tmp_path / "graphed", True)
    assert loop.keys() == graphed.keys()
    assert [k for k in loop if not torch.equal(loop[k], graphed[k])] == []


@pytest.mark.parametrize("override, message", [
    ("runtime.cuda_graph=true", "'runtime.cuda_graph': captures the training step as a CUDA graph, and this machine "
                                "has no CUDA device; set it to false"),
    ("runtime.compile=fastest", "'runtime.compile': 'fastest' is not one of ('off', 'regional', 'full')"),
])
def test_cuda_graph_without_cuda_and_unknown_compile_modes_are_refused(override, message):
    from attndreambooth.config.loading import load_config
    from attndreambooth.config.schema import ConfigError
    from conftest import SAMPLE
    if torch.cuda.is_available() and "cuda_graph" in override:
        pytest.skip("this machine has CUDA: cuda_graph is allowed here")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["output_dir=/tmp/unused", f"data.instance_dir={SAMPLE}", "data.category=toy", override])


def test_compile_true_and_false_in_older_configs_mean_full_and_off():
    from attndreambooth.config.loading import load_config
    from attndreambooth.trainer.run_folder import upgraded
    from conftest import SAMPLE
    base = ["output_dir=/tmp/unused", f"data.instance_dir={SAMPLE}", "data.category=toy"]
    assert load_config(None, base + ["runtime.compile=true"]).runtime.compile == "full"
    assert load_config(None, base + ["runtime.compile=false"]).runtime.compile == "off"
    old = upgraded({"runtime": {"compile": False}})  # a run folder written before the modes
    assert old["runtime"]["compile"] == "off" and old["runtime"]["cuda_graph"] is False
