"""LoRA stages: a stage trains only its adapter; the run's LoRA file, read by stock `load_lora_weights`,
rebuilds the trained U-Net; the merged pipeline is the base plus B @ A of the file, module by module;
infer.py loads the LoRA run with or without pipeline/, and after stage 2; a killed LoRA run resumes."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_attndreambooth as T
from conftest import ROOT, SAMPLE, tiny_overrides

RANK = 4
LORA = {"stages.stage2.lora_rank": RANK, "stages.stage3.lora_rank": RANK}


def unet_output(pipe, seed=0):
    """The U-Net's prediction for fixed latents, timesteps and the concept prompt's conditioning."""
    g = torch.Generator().manual_seed(seed)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    ids = pipe.tokenizer("a photo of a <v> toy", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(latents, t, pipe.text_encoder(ids)[0].expand(2, -1, -1)).sample


def lora_deltas(path):
    """{module name: B @ A} from a diffusers LoRA file (alpha = rank: scale 1)."""
    state = load_file(path)
    return {k[len("unet."):-len(".lora_A.weight")]: state[k.replace(".lora_A.", ".lora_B.")] @ state[k]
            for k in state if k.endswith(".lora_A.weight")}


def patched_base(tiny_dir, run, lora_file):
    """The base pipeline with the run's embedding and each LoRA module's W + B @ A written by hand."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for module, delta in lora_deltas(run / lora_file).items():
            params[f"{module}.weight"] += delta
    return pipe


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={SAMPLE}", "runtime.tensorboard=false",
            "runtime.save_merged_pipeline=true", *tiny_overrides(out, **LORA)])
    return out


def test_lora_stage_trains_only_its_adapter(tiny_pipe):
    from attndreambooth import families
    from attndreambooth.config.loading import load_config
    from attndreambooth.config.plan import Plan
    from attndreambooth.trainer.concept import add_concept_token
    from attndreambooth.trainer.lora import add_adapters, adapter_part, lora_parameter_count
    from attndreambooth.trainer.models import Models, set_trainable
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.instance_dir={SAMPLE}", "output_dir=x",
                                            *[f"{k}={v}" for k, v in LORA.items()]])
    add_concept_token(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<v>", "toy")
    family = families.by_name("sd")
    assert add_adapters(tiny_pipe.unet, Plan(cfg.stages), family) == ["stage2", "stage3"]
    models = Models(family, tiny_pipe.unet, [tiny_pipe.text_encoder], None, None, None)
    trained = {}
    for name in ("stage2", "stage3"):
        params = set_trainable(Plan(cfg.stages)[name], models)
        trainable = trained[name] = {n for n, p in tiny_pipe.unet.named_parameters() if p.requires_grad}
        assert trainable and all(f".lora_A.{name}." in n or f".lora_B.{name}." in n for n in trainable)
        assert not any(p.requires_grad for p in tiny_pipe.text_encoder.parameters())
        assert sum(p.numel() for p in params) == lora_parameter_count(
            tiny_pipe.unet, adapter_part(cfg.stages[name]), family, RANK) > 0
    assert all(".attn2." in n for n in trained["stage2"])  # stage 2: the cross-attention projections
    for module in (".attn1.to_q.", ".attn2.to_out.0.", ".ff.net.0.proj.", ".ff.net.2."):  # stage 3: the blocks
        assert sum(module in n for n in trained["stage3"]) == 16 * 2  # every block, A and B
    with torch.no_grad():  # untrained adapters (B = 0) leave the U-Net's output as it was
        out = unet_output(tiny_pipe)
        tiny_pipe.unet.disable_adapters()
        torch.testing.assert_close(out, unet_output(tiny_pipe), atol=0, rtol=0)


@pytest.mark.slow
def test_lora_file_rebuilds_the_trained_unet_in_stock_diffusers(lora_run, tiny_dir):
    from diffusers import StableDiffusionPipeline
    merged = StableDiffusionPipeline.from_pretrained(lora_run / "pipeline")
    base = StableDiffusionPipeline.from_pretrained(tiny_dir)
    deltas = lora_deltas(lora_run / "pytorch_lora_weights.safetensors")
    assert len(deltas) == 16 * 10  # per transformer block: attn1, attn2 (q, k, v, out) and ff (2)
    ranks = {m: load_file(lora_run / "pytorch_lora_weights.safetensors")[f"unet.{m}.lora_A.weight"].shape[0]
             for m in deltas}
    assert {r for m, r in ranks.items() if ".attn2." in m} == {2 * RANK} and {r for m, r in ranks.items()
                                                                           if ".attn2." not in m} == {RANK}
    base_params, merged_params = dict(base.unet.named_parameters()), dict(merged.unet.named_parameters())
    assert base_params.keys() == merged_params.keys()  # the merged U-Net has the stock names
    for name, w in base_params.items():
        module = name.rsplit(".", 1)[0]
        if module in deltas and name.endswith(".weight"):
            torch.testing.assert_close(merged_params[name] - w, deltas[module], atol=2e-6, rtol=0)
            assert deltas[module].abs().max() > 0  # the stage trained it
        else:
            assert torch.equal(merged_params[name], w), name  # nothing outside the adapters moved
    base.load_textual_inversion(str(lora_run / "learned_embeds.safetensors"))
    base.load_lora_weights(str(lora_run))  # stock diffusers, the default file name
    torch.testing.assert_close(unet_output(base), unet_output(merged), atol=1e-5, rtol=1e-5)


def test_kohya_file_holds_the_same_adapters_under_the_clients_names(lora_run, tiny_dir):
    """pytorch_lora_weights_kohya.safetensors (ComfyUI, AUTOMATIC1111, kohya): every key follows kohya's
    convention and names a linear layer of the U-Net; up @ down x alpha / rank is the diffusers file's B @ A,
    module by module, and no module or key is left over on either side. The diffusers file is consumed
    whole by diffusers' own loader: every module it names gets an adapter."""
    import re

    from diffusers import StableDiffusionPipeline
    kohya = load_file(lora_run / "pytorch_lora_weights_kohya.safetensors")
    deltas = lora_deltas(lora_run / "pytorch_lora_weights.safetensors")
    pattern = re.compile(r"lora_unet_([a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
    assert all(pattern.fullmatch(k) for k in kohya), [k for k in kohya if not pattern.fullmatch(k)][:3]
    base = StableDiffusionPipeline.from_pretrained(tiny_dir)
    linear = {n.replace(".", "_"): n for n, m in base.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = {pattern.fullmatch(k).group(1) for k in kohya}
    assert modules <= linear.keys() and {linear[m] for m in modules} == deltas.keys()
    assert len(kohya) == 3 * len(modules)
    for m in modules:
        down, up, alpha = (kohya[f"lora_unet_{m}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.dtype == torch.float32 and alpha.item() == down.shape[0]  # scale alpha / rank = 1
        torch.testing.assert_close(up @ down * (alpha / down.shape[0]), deltas[linear[m]], atol=0, rtol=0)
    base.load_lora_weights(str(lora_run))
    wrapped = {n for n, m in base.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == deltas.keys()


def test_infer_loads_lora_runs_and_their_stages(lora_run, tiny_dir, tmp_path):
    from attndreambooth.inference.loading import load_pipe
    slim = tmp_path / "slim"  # the default LoRA run: no pipeline/
    shutil.copytree(lora_run, slim, ignore=shutil.ignore_patterns("pipeline"))
    want = unet_output(patched_base(tiny_dir, lora_run, "pytorch_lora_weights.safetensors"))
    for run in (lora_run, slim):
        pipe, concept, _ = load_pipe(run)
        assert concept == "<v> toy"
        torch.testing.assert_close(unet_output(pipe), want, atol=1e-5, rtol=1e-5)
    after_stage2 = unet_output(load_pipe(slim, stage=2)[0])
    torch.testing.assert_close(after_stage2, unet_output(patched_base(tiny_dir, lora_run, "lora_stage2.safetensors")),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after_stage2, want, atol=1e-4)  # stage 3's adapter changed the U-Net


@pytest.mark.slow
def test_killed_lora_run_resumes_to_the_same_adapters(tmp_path):
    from test_resume import train
    runs = {}
    for name, faults in (("straight", []), ("killed", ["--kill=stage3:4"])):
        out = runs[name] = tmp_path / name
        first = train(out, faults, **LORA)
        if faults:
            assert first.returncode == -9 and not (out / "pytorch_lora_weights.safetensors").exists()
            first = train(out, **LORA)
            assert "resuming from" in first.stdout
        assert first.returncode == 0, first.stderr[-2000:]
        assert not (out / "pipeline").exists()  # a LoRA run writes the merged model only when asked
    want, got = (load_file(runs[n] / "pytorch_lora_weights.safetensors") for n in ("straight", "killed"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # bit for bit


def test_a_lora_file_of_another_family_is_named_before_it_loads(lora_run, tmp_path):
    """An SD LoRA file (either format) given to --unet_weights over the SDXL base: one line saying it is a LoRA
    for another model (diffusers loaded it partly, or failed with its own message)."""
    import infer
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        with pytest.raises(SystemExit) as e:
            infer.main(["--base", "tiny-sdxl", "--unet_weights", str(lora_run / name), "--prompt", "a toy",
                        "--num_images", "1", "--steps", "1", "--out", str(tmp_path / "o")])
        assert f"{lora_run / name} is a LoRA for another model" in str(e.value.code), e.value.code
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_finished_lora_run_writes_the_merged_pipeline_a_rerun_asks_for(lora_run, tmp_path, caplog):
    import yaml
    from diffusers import StableDiffusionPipeline
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "pipeline")  # as if trained with runtime.save_merged_pipeline=false
    record = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(record.replace("save_merged_pipeline: true", "save_merged_pipeline: false"))
    args = ["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={SAMPLE}", "runtime.tensorboard=false"]
    kept = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    T.main(args + tiny_overrides(run, **LORA, **{"validation.steps": 3}))
    assert "validation.steps changed (25 -> 3): it acts only while training" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == kept and not (run / "pipeline").exists()
    T.main(args + tiny_overrides(run, **LORA, **{"runtime.save_merged_pipeline": "true"}))  # asked for: written
    assert yaml.safe_load((run / "config.yaml").read_text())["runtime"]["save_merged_pipeline"] is True  # recorded
    assert (run / "config.yaml").read_text().startswith("# trained by 1 process\n")  # its header kept
    trained, rebuilt = (StableDiffusionPipeline.from_pretrained(p) for p in (lora_run / "pipeline", run / "pipeline"))
    for name, w in trained.unet.state_dict().items():  # the same merge as at the end of training, from the files
        torch.testing.assert_close(rebuilt.unet.state_dict()[name], w, atol=1e-6, rtol=0)
    torch.testing.assert_close(unet_output(rebuilt), unet_output(trained), atol=1e-5, rtol=1e-5)
    assert type(rebuilt.scheduler) is type(trained.scheduler)  # the base's scheduler, not a sampling one
    again = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    T.main(args + tiny_overrides(run, **LORA, **{"runtime.save_merged_pipeline": "true"}))
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == again  # nothing left to do
    assert "finished run: nothing to do" in caplog.text
    shutil.rmtree(run / "pipeline")  # deleted by hand: the adapters are still there, so it is merged again
    T.main(args + tiny_overrides(run, **LORA, **{"runtime.save_merged_pipeline": "true"}))
    assert "merged pipeline/ is missing (deleted or moved?): merging it again" in caplog.text
    assert (run / "pipeline" / "model_index.json").is_file()
