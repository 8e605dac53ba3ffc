"""The trainer on the tiny model: each stage trains exactly its parameters, the run folder reloads
with stock diffusers, the objective's target, and the [V] gradient under two processes."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

import train_attndreambooth as T
from attndreambooth.config.loading import load_config
from attndreambooth.families import Conditioning, by_name
from attndreambooth.trainer.method import AttnDreamBoothLoss

SD = by_name("sd")
from conftest import ROOT, tiny_overrides

TINY = ["--config", str(ROOT / "configs/tiny.yaml")]


def load(folder):
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def te_state(pipe):
    """Text encoder state dict with the key names of transformers 5 (4.x prefixes "text_model.")."""
    return {n.removeprefix("text_model."): t for n, t in pipe.text_encoder.state_dict().items()}


def changed(a, b):
    """Names of the tensors that differ between two state dicts."""
    return {n for n in a if not torch.equal(a[n], b[n])}


@pytest.fixture(scope="module")
def base(tiny_dir):
    pipe = load(tiny_dir)
    return dict(unet=pipe.unet.state_dict(), te=te_state(pipe), vae=pipe.vae.state_dict(),
                cat_id=pipe.tokenizer("toy", add_special_tokens=False).input_ids[0], vocab=len(pipe.tokenizer))


def run_only(stage, tmp_path, **extra):
    others = {f"stages.{s}.enabled": "false" for s in ("stage1", "stage2", "stage3") if s != stage}
    T.main(TINY + tiny_overrides(tmp_path / stage, **others, **{f"stages.{stage}.steps": 2}, **extra))
    return tmp_path / stage, load(tmp_path / stage / "pipeline")


EMB = "embeddings.token_embedding.weight"


def test_stage1_trains_only_the_placeholder_row(base, tmp_path):
    out, pipe = run_only("stage1", tmp_path)
    te = te_state(pipe)
    assert changed(pipe.unet.state_dict(), base["unet"]) == set()
    assert changed(pipe.vae.state_dict(), base["vae"]) == set()
    assert {n for n in te if n != EMB and not torch.equal(te[n], base["te"][n])} == set()
    rows = te[EMB]
    assert rows.shape[0] == base["vocab"] + 1 and torch.equal(rows[:-1], base["te"][EMB])  # old rows untouched
    learned = load_file(out / "learned_embeds.safetensors")["<v>"]
    assert learned.shape == (1, rows.shape[1])  # (num_vectors, dim), as diffusers' textual-inversion script saves
    learned = learned[0]
    assert torch.equal(rows[-1], learned)
    assert not torch.equal(learned, base["te"][EMB][base["cat_id"]])  # moved from its init, the category row
    assert pipe.tokenizer.convert_tokens_to_ids("<v>") == base["vocab"]


def test_stage2_trains_only_cross_attention(base, tmp_path):
    out, pipe = run_only("stage2", tmp_path)
    unet = pipe.unet.state_dict()
    assert changed(unet, base["unet"]) == {n for n in unet if ".attn2." in n}
    assert changed(pipe.vae.state_dict(), base["vae"]) == set()
    # [V] stays at its init, the category's embedding, when stage 1 is off
    assert torch.equal(te_state(pipe)[EMB][-1], base["te"][EMB][base["cat_id"]])
    saved = load_file(out / "attn2_stage2.safetensors")
    assert set(saved) == {n for n in unet if ".attn2." in n}
    assert all(torch.equal(saved[n], unet[n]) for n in saved)


def test_stage3_trains_the_whole_unet(base, tmp_path):
    _, pipe = run_only("stage3", tmp_path, **{"stages.stage3.lr": 1e-4})
    unet = pipe.unet.state_dict()
    assert changed(unet, base["unet"]) == set(unet)
    assert changed(pipe.vae.state_dict(), base["vae"]) == set()
    te = te_state(pipe)
    assert {n for n in te if n != EMB and not torch.equal(te[n], base["te"][n])} == set()


@pytest.mark.slow
def test_same_seed_same_result_other_seed_differs(tmp_path):
    rows = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out, _ = run_only("stage1", tmp_path / name, **{"runtime.seed": seed})
        rows.append(load_file(out / "learned_embeds.safetensors")["<v>"])
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])


def test_end_to_end_run_folder_reloads_with_stock_diffusers(tmp_path):
    out = tmp_path / "run"
    T.main(TINY + tiny_overrides(out))
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "train.log", "metrics.jsonl", "learned_embeds.safetensors", "attn2_stage2.safetensors",
            "pipeline"} <= names
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["step"]) for m in metrics] == [(s, i) for s in ("stage1", "stage2", "stage3") for i in (1, 2, 3)]
    assert all(m["loss"] == pytest.approx(m["mse"] + m["reg"]) for m in metrics)
    assert load_config(out / "config.yaml").stages["stage3"].steps == 3  # the resolved config reloads

    pipe = load(out / "pipeline")  # stock diffusers, nothing of this project
    ids = pipe.tokenizer("a photo of a <v> toy").input_ids
    vid = pipe.tokenizer.convert_tokens_to_ids("<v>")
    assert ids.count(vid) == 1
    row = pipe.text_encoder.get_input_embeddings().weight[vid]
    torch.testing.assert_close(row, load_file(out / "learned_embeds.safetensors")["<v>"][0], rtol=0, atol=0)
    image = pipe("a photo of a <v> toy", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_objective_target_follows_prediction_type(tiny_pipe, prediction_type):
    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type=prediction_type)
    unet = tiny_pipe.unet
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, cond = torch.tensor([3, 900]), torch.randn(1, 77, 32, generator=g)
    objective = AttnDreamBoothLoss(SD, unet, [tiny_pipe.text_encoder], sched, capture=None, reduction="per_layer")
    with torch.no_grad():
        loss, mse, reg, _, _, _ = objective(x0, noise, t, cond=Conditioning(cond), mean_weight=2.0,
                                         var_weight=5.0).values()
        assert reg.item() == 0 and loss.item() == mse.item()  # no capture: the regulariser is off
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        want = F.mse_loss(unet(noisy, t, cond.expand(2, -1, -1)).sample, target)
    assert mse.item() == pytest.approx(want.item(), rel=1e-5)


def torchrun(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_ranks.py"), *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "sdxl"])
def test_two_processes_end_every_stage_with_identical_weights(tmp_path, mode):
    """torchrun, 2 CPU processes (gloo): different data per rank, the same weights on both after each
    stage (the [V] row's gradient is all-reduced too; "sdxl" trains LoRA adapters on the tiny SDXL model, so
    the adapters and both encoders' rows), and only rank 0 writes the run."""
    done = torchrun(tmp_path, *([mode] if mode != "full" else []))
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("stage1", "stage2", "stage3"):
        r0, r1 = (load_file(tmp_path / f"rank{r}_{stage}.safetensors") for r in (0, 1))
        assert not torch.equal(r0["first_latents"], r1["first_latents"])  # the ranks saw different batches
        torch.testing.assert_close(r0["row"], r1["row"], rtol=0, atol=0)
        torch.testing.assert_close(r0["unet"], r1["unet"], rtol=0, atol=0)
        assert ("row_2" in r0) == (mode == "sdxl")
        if mode == "sdxl":
            torch.testing.assert_close(r0["row_2"], r1["row_2"], rtol=0, atol=0)
    first = load_file(tmp_path / "rank0_stage1.safetensors")
    assert not torch.equal(first["row"], first["init"])  # and trained
    last = load_file(tmp_path / "rank0_stage3.safetensors")["unet"]
    assert last.shape == first["unet"].shape and not torch.equal(last, first["unet"])  # stages 2-3 trained
    if mode != "full":
        assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    if mode == "sdxl":  # the second row trained in stage 1 as the first did, and is what the run saved
        assert not torch.equal(first["row_2"], first["init_2"])
        assert torch.equal(load_file(tmp_path / "run" / "learned_embeds.safetensors")["clip_g"][0], first["row_2"])
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 9  # one writer, 9 steps


@pytest.mark.slow
def test_a_fault_on_one_rank_stops_both_with_the_message(tmp_path):
    failed = torchrun(tmp_path, "nan")
    assert failed.returncode != 0
    assert failed.stderr.count("stage1 step 2: the loss is not finite") + failed.stdout.count(
        "stage1 step 2: the loss is not finite") >= 2  # both ranks stop, neither hangs


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_second_node_writes_nothing_to_the_run_folder(tmp_path):
    """Two torchrun "nodes" of one process each: the second node's process is RANK 1 and LOCAL_RANK 0, as on
    another machine of a multi-node job. Everything the run folder holds (lock, config, logs, checkpoints,
    weights) is written by the global rank 0; the other node's local rank 0 writes nothing."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(ROOT / "tests" / "node_writes.py"), str(tmp_path)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    first, second = (json.loads((tmp_path / f"writes_rank{r}.json").read_text()) for r in (0, 1))
    assert second == []
    wrote = "\n".join(first)  # the recording sees each kind of write the run makes
    for what in ("open .lock", "open train.log", "open metrics.jsonl", "open config.yaml", "open tensorboard/",
                 "save_file resume/.tmp-ckpt-", "save_file .tmp-learned_embeds.safetensors", "os.rename"):
        assert what in wrote, (what, first)
    assert (tmp_path / "run" / "finished.json").is_file()


def test_objective_optimises_mse_plus_the_public_eq2(tiny_pipe):
    """The loss that trains is MSE + attention_reg.attention_reg_loss with the stage's weights."""
    from attention_reg import CrossAttentionCapture, attention_reg_loss
    unet, g = tiny_pipe.unet, torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, cond = torch.tensor([3, 900]), torch.randn(1, 77, 32, generator=g)
    with CrossAttentionCapture(unet, [5, 6]) as cap:
        objective = AttnDreamBoothLoss(SD, unet, [tiny_pipe.text_encoder], tiny_pipe.scheduler, cap, "pooled")
        loss, mse, reg, mean_term, var_term, _ = objective(x0, noise, t, cond=Conditioning(cond), mean_weight=2.0,
                                                        var_weight=5.0).values()
        want = attention_reg_loss(cap.maps, 2.0, 5.0, "pooled")
    assert reg.item() == pytest.approx(want.item(), rel=1e-6) and reg.item() > 0
    assert loss.item() == pytest.approx(mse.item() + want.item(), rel=1e-6)
    assert reg.item() == pytest.approx(2 * mean_term.item() + 5 * var_term.item(), rel=1e-5)
    loss.backward()  # the loss carries the graph through the maps
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if ".attn2.to_k" in n)


def test_cached_conditioning_follows_v_when_a_later_stage_moves_it(tmp_path, monkeypatch):
    """Stage order unet, embedding, unet: the last stage must train against the new [V], not the
    conditioning cached in the first."""
    import attndreambooth.trainer.method as TR
    seen, original = {}, TR.train_stage

    def train_stage(planned, models, *args, **kwargs):
        result = original(planned, models, *args, **kwargs)
        with torch.no_grad():
            seen[planned.name] = (None if models.cond is None else models.cond.hidden.clone(),
                          models.text_encoders[0](models.input_ids[0])[0].float())
        return result

    monkeypatch.setattr(TR, "train_stage", train_stage)
    T.main(TINY + tiny_overrides(tmp_path / "r", **{
        "stages.stage1.train": "[unet]", "stages.stage2.train": "[embedding]", "stages.stage2.lr": 0.1,
        "stages.stage3.train": "[unet]", "stages.stage1.steps": 1, "stages.stage3.steps": 1}))
    first, _ = seen["stage1"]
    last, fresh = seen["stage3"]
    assert not torch.allclose(first, fresh)  # stage 2 moved [V]
    torch.testing.assert_close(last, fresh)  # and stage 3 used the moved [V]


def test_log_lines_go_through_tqdm_while_bars_run(tmp_path):
    """During the stages the console handler is tqdm's (a log line never lands on a bar's line); the
    log file keeps its own handler; afterwards the console handler is back."""
    from tqdm.contrib.logging import _TqdmLoggingHandler

    from attndreambooth.trainer.method import FaultInjection
    seen = {}

    class Look(FaultInjection):
        def at(self, point):
            if point == "stage1:1":
                seen["during"] = [type(h) for h in logging.getLogger().handlers]

    T.main(TINY + tiny_overrides(tmp_path / "r"), faults=Look())
    assert _TqdmLoggingHandler in seen["during"] and logging.FileHandler in seen["during"]
    assert _TqdmLoggingHandler not in [type(h) for h in logging.getLogger().handlers]


def test_a_finished_run_without_its_pipeline_says_so_in_both_tools(tmp_path):
    """pipeline/ deleted after a run finished: the trainer said "finished: nothing to do" and infer.py "not
    finished: resume training", a dead end; now both say what is missing and the two ways out."""
    import shutil

    import infer
    out = T.main(TINY + tiny_overrides(tmp_path / "r"))
    shutil.rmtree(out / "pipeline")
    with pytest.raises(SystemExit) as e:
        T.main(TINY + tiny_overrides(tmp_path / "r"))
    assert "is a finished run, but pipeline/model_index.json is missing" in str(e.value.code)
    assert "resume=false" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        infer.main([str(out), "--prompt", "a {}", "--num_images", "1", "--steps", "1"])
    assert "has finished but its pipeline/ is missing" in str(e.value.code)
