"""infer.py and the run folder's interoperability, on a short tiny run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import attndreambooth.inference.generate as G
import infer
import train_attndreambooth as T
from attndreambooth.inference.generate import generate, slug
from attndreambooth.inference.loading import load_pipe
from attndreambooth.trainer.concept import add_concept_token, encode_prompt
from conftest import ROOT, tiny_overrides

TINY = ["--config", str(ROOT / "configs/tiny.yaml")]
FAST = dict(steps=2, guidance_scale=7.5, batch_size=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short run twice: with validation grids every 2 steps and TensorBoard, and without."""
    from accelerate.state import AcceleratorState
    root = tmp_path_factory.mktemp("runs")
    T.main(TINY + tiny_overrides(root / "val", **{"validation.every_steps": 2, "validation.steps": 2}))
    AcceleratorState._reset_state(True)
    T.main(TINY + tiny_overrides(root / "plain", **{"runtime.tensorboard": "false"}))
    return root / "val", root / "plain"


@pytest.mark.slow
def test_validation_writes_grids_and_changes_no_weight(runs):
    val, plain = runs
    assert sorted(p.name for p in (val / "validation").iterdir()) == [
        "stage1_00002.png", "stage1_00003.png", "stage2_00002.png", "stage2_00003.png",
        "stage3_00002.png", "stage3_00003.png"]
    grid = Image.open(val / "validation" / "stage3_00003.png")
    assert grid.size == (2 * 64, 2 * 64)  # 2 prompts x 2 images of 64 px
    for sub in ("unet", "text_encoder"):
        a = load_file(next((val / "pipeline" / sub).glob("*.safetensors")))
        b = load_file(next((plain / "pipeline" / sub).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "tensorboard").exists()


def test_tensorboard_has_losses_and_grids(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs[0] / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    logged = [e.value for e in events.Scalars("stage3/reg_var")]
    assert logged == pytest.approx([m["reg_var"] for m in metrics if m["stage"] == "stage3"], rel=1e-6)
    assert {"stage1/loss", "stage2/reg_mean", "stage3/lr"} <= set(events.Tags()["scalars"])
    assert "validation/stage3" in events.Tags()["images"]
    import yaml  # runtime.report_to: the run's config arrives as the tracker's hyper-parameters
    (hparams,) = (runs[0] / "tensorboard").glob("*/hparams.yml")
    values = yaml.safe_load(hparams.read_text())
    config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert values["data.category"] == config["data"]["category"] == "toy"
    assert values["stages.stage3.steps"] == config["stages"]["stage3"]["steps"] and values["runtime.report_to"] == "['tensorboard']"


def test_generate_is_reproducible_per_seed(runs, tmp_path):
    pipe, concept, _ = load_pipe(runs[1])
    a = generate(pipe, concept, ["a {} on the beach"], tmp_path / "a", num_images=3, seed=5, **FAST)
    b = generate(pipe, concept, ["a {} on the beach"], tmp_path / "b", num_images=3, seed=5,
                       **dict(FAST, batch_size=1))  # image i depends on seed + i only, not on batching
    c = generate(pipe, concept, ["a {} on the beach"], tmp_path / "c", num_images=3, seed=6, **FAST)
    (ia,), (ib,), (ic,) = a.values(), b.values(), c.values()
    a2 = generate(pipe, concept, ["a {} on the beach"], tmp_path / "a2", num_images=3, seed=5, **FAST)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(ia, *a2.values()))  # identical twice
    # batching changes float rounding only (a level or two of 255)
    assert all(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 2 for x, y in zip(ia, ib))
    assert np.abs(np.asarray(ia[1], dtype=int) - np.asarray(ic[0], dtype=int)).max() <= 2  # seed 5 + 1 == 6 + 0
    assert not np.array_equal(np.asarray(ia[0]), np.asarray(ic[0]))
    folder = next((tmp_path / "a").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png", "002.png", "grid.png", "prompt.json"]
    meta = json.loads(Image.open(folder / "002.png").text["parameters"])
    assert meta["prompt"] == "a <v> toy on the beach" and meta["seed"] == 7 and meta["steps"] == 2


def test_batches_across_prompts_give_each_prompt_its_own_images_and_maps(runs, tmp_path):
    """One denoiser call holding images of several prompts (batch 5 over 3 prompts x 2 images) gives every
    prompt the images and attention maps of sampling it alone (to a level of 255: batching rounds floats)."""
    pipe, concept, _ = load_pipe(runs[1])
    prompts = ["a {} on the beach", "a {} in the snow", "a red {}"]
    together = generate(pipe, concept, prompts, tmp_path / "t", num_images=2, seed=3, attention_maps=True,
                              **dict(FAST, batch_size=5))
    for template in prompts:
        alone = generate(pipe, concept, [template], tmp_path / "a", num_images=2, seed=3, attention_maps=True,
                               **dict(FAST, batch_size=2))
        (images,) = alone.values()
        mixed = together[template.replace("{}", concept)]
        assert all(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 2 for x, y in zip(images, mixed))
        name = slug(template.replace("{}", "V"))
        maps_t = np.load(next((tmp_path / "t").glob(f"{name}-*/attention_maps.npz")))["maps"]
        maps_a = np.load(next((tmp_path / "a").glob(f"{name}-*/attention_maps.npz")))["maps"]
        np.testing.assert_allclose(maps_t, maps_a, atol=1e-4)
        assert not np.allclose(maps_t[0], maps_t[1])  # image 0 and 1: seeds 3 and 4, not one map twice


@pytest.mark.slow
def test_pipeline_folder_works_without_this_project(runs, tiny_dir, tmp_path):
    """A subprocess with only diffusers loads pipeline/, makes an image, and its conditioning for the
    training prompt equals what the training code computes from the base model and the learned row."""
    code = (
        "import sys, torch; from diffusers import StableDiffusionPipeline; from safetensors.torch import save_file\n"
        "p = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "ids = p.tokenizer('a photo of a <v> toy', padding='max_length', max_length=77, return_tensors='pt').input_ids\n"
        "im = p('a <v> toy', num_inference_steps=2, output_type='np', generator=torch.Generator().manual_seed(0)).images\n"
        "assert 'attndreambooth' not in sys.modules and 'attention_reg' not in sys.modules\n"
        "save_file({'cond': p.text_encoder(ids)[0].detach(), 'image': torch.from_numpy(im).contiguous()}, sys.argv[2])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code, str(runs[1] / "pipeline"), str(tmp_path / "o.safetensors")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    got = load_file(tmp_path / "o.safetensors")
    assert got["image"].shape == (1, 64, 64, 3) and got["image"].std() > 0
    base = load_pipe(base=tiny_dir, embeds=runs[1] / "learned_embeds.safetensors", category="toy")[0]
    from diffusers import StableDiffusionPipeline
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir)
    token_id, cat_ids = add_concept_token(fresh.tokenizer, fresh.text_encoder, "<v>", "toy")
    with torch.no_grad():
        fresh.text_encoder.get_input_embeddings().row.copy_(load_file(runs[1] / "learned_embeds.safetensors")["<v>"][0])
        ids, _, _ = encode_prompt(fresh.tokenizer, "a photo of a <v> toy", token_id, cat_ids)
        training_cond = fresh.text_encoder(ids)[0]  # the training code's path (ConceptEmbedding)
        ti_cond = base.text_encoder(ids)[0]  # diffusers' load_textual_inversion on the base
    torch.testing.assert_close(got["cond"], training_cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ti_cond, training_cond, atol=1e-5, rtol=1e-5)


def test_a1111_embedding_matches(runs):
    a1111 = load_file(runs[1] / "embedding_a1111.safetensors")
    assert list(a1111) == ["emb_params"] and a1111["emb_params"].shape == (1, 32)
    assert torch.equal(a1111["emb_params"], load_file(runs[1] / "learned_embeds.safetensors")["<v>"])


def test_stage_1_and_2_states(runs, tiny_dir):
    from diffusers import UNet2DConditionModel
    base_unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").state_dict()
    s1 = load_pipe(runs[1], stage=1)[0].unet.state_dict()
    assert all(torch.equal(s1[k], base_unet[k]) for k in base_unet)  # stage 1: base U-Net + embedding
    s2 = load_pipe(runs[1], stage=2)[0].unet.state_dict()
    attn2 = load_file(runs[1] / "attn2_stage2.safetensors")
    assert set(attn2) == {k for k in s2 if ".attn2." in k}
    assert all(torch.equal(s2[k], attn2[k] if k in attn2 else base_unet[k]) for k in s2)
    assert not all(torch.equal(attn2[k], base_unet[k]) for k in attn2)
    final = load_pipe(runs[1])[0].unet.state_dict()
    assert not all(torch.equal(final[k], s2[k]) for k in s2)
    with pytest.raises(ValueError, match="stages 1..3"):
        load_pipe(runs[1], stage=4)


def test_unet_weights_for_another_model_are_refused(runs, tiny_dir, tmp_path):
    save_file({"not.a.unet.key": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="not in this U-Net"):
        load_pipe(base=tiny_dir, embeds=runs[1] / "learned_embeds.safetensors", category="toy",
                        unet_weights=[tmp_path / "w.safetensors"])


def test_attention_maps_cli(runs, tmp_path, capsys):
    out = tmp_path / "maps"
    infer.main([str(runs[1]), "--prompt", "a {} inside a box", "--num_images", "2", "--steps", "2",
                "--attention_maps", "--out", str(out), "--scheduler", "ddim"])
    folder = next(out.iterdir())
    data = np.load(folder / "attention_maps.npz")
    assert data["maps"].shape == (2, 77, 8, 8)  # images, tokens, latent grid
    np.testing.assert_allclose(data["maps"].sum(axis=1), 1.0, atol=1e-5)  # each pixel's tokens sum to 1
    assert list(data["tokens"]) == ["a", "<v>", "toy", "inside", "a", "box"]
    fig = Image.open(folder / "attention.png")
    assert fig.width == (1 + 6) * 128  # the image and one panel per token


def test_prompt_file_and_missing_placeholder_warning(runs, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# a comment\na {} in the snow\n\na red dog\n")
    with caplog.at_level("WARNING"):
        infer.main([str(runs[1]), "--prompt_file", str(prompts), "--num_images", "1", "--steps", "1",
                    "--out", str(tmp_path / "o")])
    assert "no {} placeholder" in caplog.text
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert [n.rsplit("-", 1)[0] for n in names] == ["a_red_dog", "a_v_in_the_snow"]
    assert all(len(n.rsplit("-", 1)[1]) == 8 for n in names)


def test_fp16_pipeline_save(tmp_path):
    T.main(TINY + tiny_overrides(tmp_path / "r", **{"runtime.pipeline_dtype": "fp16", "stages.stage2.enabled": "false",
                                                    "stages.stage3.enabled": "false"}))
    unet = load_file(next((tmp_path / "r" / "pipeline" / "unet").glob("*.safetensors")))
    assert all(t.dtype == torch.float16 for t in unet.values())
    text = load_file(next((tmp_path / "r" / "pipeline" / "text_encoder").glob("*.safetensors")))
    assert all(t.dtype == torch.float16 for t in text.values())  # half the disk, the text encoder included


@pytest.mark.parametrize("folder", ["run", "shapes"])
def test_half_precision_folders_load_with_the_stock_default_call(tmp_path, folder):
    """StableDiffusionPipeline.from_pretrained(folder) with no dtype argument, then a call: diffusers loads the
    U-Net in fp32, and the text encoder must come up in fp32 too (else: mat1 and mat2 ... Half and Float),
    for a run's fp16 pipeline/ and for the shipped fp16 shapes model; with torch_dtype=fp16 both are fp16."""
    from diffusers import StableDiffusionPipeline
    if folder == "run":
        T.main(TINY + tiny_overrides(tmp_path / "r", **{"runtime.pipeline_dtype": "fp16",
                                                        "stages.stage2.enabled": "false",
                                                        "stages.stage3.enabled": "false"}))
        path = tmp_path / "r" / "pipeline"
    else:
        path = ROOT / "models" / "shapes"
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    image = pipe("a big red star", num_inference_steps=1, output_type="np").images[0]
    assert np.isfinite(image).all()
    half = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float16)
    assert half.text_encoder.dtype == half.unet.dtype == torch.float16


def test_old_bin_embeddings_load_without_arbitrary_pickle(runs, tiny_dir, tmp_path):
    row = load_file(runs[1] / "learned_embeds.safetensors")["<v>"][0]
    torch.save({"<v>": row}, tmp_path / "learned_embeds.bin")  # the older files: a 1-D row
    pipe = load_pipe(base=tiny_dir, embeds=tmp_path / "learned_embeds.bin", category="toy")[0]
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[-1], row, rtol=0, atol=0)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))
    torch.save({"<v>": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported"):
        load_pipe(base=tiny_dir, embeds=tmp_path / "evil.bin", category="toy")


@pytest.mark.parametrize("args, message", [
    (["--num_images", "0"], "--num_images must be >= 1"),
    (["--batch_size", "-1"], "--batch_size must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num_images", "1000000"], "--num_images 1,000,000 is more than 10,000; sample in several calls"),
    (["--steps", "50000"], "--steps 50,000 is more than 1,000"),
    (["--height", "100"], "--height must be a positive multiple of 8"),
    (["--stage", "0"], "--stage must be 1 or more"),
    (["--seed", "-1"], "--seed -1 must be in 0 .. 4294967295"),
    (["--guidance_scale", "0.5"], "--guidance_scale 0.5 would switch classifier-free guidance off"),
    (["--stage", "9"], "--stage 9: the run has stages 1..3"),
    (["--prompt_file", "/no/such/prompts.txt"], "--prompt_file /no/such/prompts.txt does not exist"),
    (["--stage", "stage9"], "--stage stage9: the run has stages 1..3 (stage1, stage2, stage3)"),
    (["--unet_weights", "w.safetensors"], "--unet_weights: for a base model without a run folder"),
    (["--embeds", "e.safetensors", "--base", "tiny"], "--base, --embeds: for a base model without a run folder"),
    (["--device", "gpu"], "--device 'gpu' is not a device name; use cpu, cuda or cuda:N"),
    (["--out", ""], "--out is empty (an unset shell variable?)"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["--out", "{run}/config.yaml/samples"], "--out: {run}/config.yaml/samples would be inside {run}/config.yaml, which is a file"),
])
def test_bad_arguments_are_refused_before_loading(runs, monkeypatch, args, message):
    import attndreambooth.families.source as M
    from diffusers import StableDiffusionPipeline
    monkeypatch.setattr(M, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit) as e:
        infer.main([str(runs[1]), "--prompt", "a {}", *(a.replace("{run}", str(runs[1])) for a in args)])
    assert message.replace("{run}", str(runs[1])) in str(e.value.code) and str(e.value.code).startswith("error: ")


def test_missing_or_corrupt_weight_files_are_named_before_loading(runs, tiny_dir, tmp_path, monkeypatch):
    import attndreambooth.families.source as M
    monkeypatch.setattr(M, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    (tmp_path / "cut.safetensors").write_bytes((runs[1] / "learned_embeds.safetensors").read_bytes()[:40])
    (tmp_path / "notes.txt").write_text("not weights")
    embeds = str(runs[1] / "learned_embeds.safetensors")
    base = ["--base", str(tiny_dir), "--category", "toy", "--prompt", "a {}", "--out", str(tmp_path / "o")]
    for args, message in (
            (["--embeds", str(tmp_path / "gone.safetensors")], "--embeds {}/gone.safetensors does not exist"),
            (["--embeds", str(tmp_path / "cut.safetensors")], "--embeds {}/cut.safetensors is not a readable safetensors"),
            (["--embeds", embeds, "--unet_weights", str(tmp_path)], "--unet_weights {} is a folder"),
            (["--embeds", embeds, "--unet_weights", str(tmp_path / "notes.txt")],
             "--unet_weights {}/notes.txt is not a readable safetensors")):
        with pytest.raises(SystemExit) as e:
            infer.main(base + args)
        assert str(e.value.code).startswith("error: " + message.format(tmp_path)), e.value.code
    run = tmp_path / "run"  # a run folder with a file cut short
    shutil.copytree(runs[1], run, ignore=shutil.ignore_patterns("pipeline"))
    (run / "attn2_stage2.safetensors").write_bytes((run / "attn2_stage2.safetensors").read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        infer.main([str(run), "--stage", "2", "--prompt", "a {}", "--out", str(tmp_path / "o")])
    assert str(e.value.code).startswith(f"error: the run's {run}/attn2_stage2.safetensors is not a readable")
    assert not (tmp_path / "o").exists()


def test_empty_or_folder_prompt_file_is_named(tmp_path, runs):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    for path, message in ((tmp_path / "empty.txt", "holds no prompt"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as e:
            infer.main([str(runs[1]), "--prompt_file", str(path)])
        assert message in str(e.value.code)


def test_unfinished_run_says_so(runs, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(runs[1], run)
    shutil.rmtree(run / "pipeline")
    (run / "finished.json").unlink()
    with pytest.raises(SystemExit) as e:
        infer.main([str(run), "--prompt", "a {}"])
    assert "has not finished (no pipeline/): use --stage" in str(e.value.code)
    (run / "attn2_stage2.safetensors").unlink()
    with pytest.raises(SystemExit) as e:
        infer.main([str(run), "--prompt", "a {}", "--stage", "2"])
    assert "has no attn2_stage2.safetensors yet" in str(e.value.code)
    assert "resume training with the same command" in str(e.value.code)
    from attndreambooth.trainer.run_folder import hold_folder
    training = hold_folder(run)  # as a training that runs now (a resume would be refused: not what to advise)
    try:
        with pytest.raises(SystemExit) as e:
            infer.main([str(run), "--prompt", "a {}", "--stage", "2"])
    finally:
        training.close()
    assert f"it is training now (pid {os.getpid()} on " in str(e.value.code)
    assert "resume" not in str(e.value.code)


def test_prompt_folders_never_collide_and_record_their_model(runs, tmp_path):
    """Prompts that slug alike get their own folders (a second call used to delete the first one's images);
    the same prompt after stage 1 and after the last stage too; prompt.json and every PNG say which run,
    stage and weights made them."""
    run = runs[1]
    out = tmp_path / "o"
    alike = ["a {} dog!", "A {} DOG?", "🐶 {}", "✨ {}"]
    for prompt in alike:
        infer.main([str(run), "--prompt", prompt, "--num_images", "1", "--steps", "1", "--out", str(out)])
    infer.main([str(run), "--prompt", "a {} dog!", "--num_images", "1", "--steps", "1", "--out", str(out), "--stage", "1"])
    folders = sorted(out.iterdir())
    assert len(folders) == 5 and all(len(list(f.glob("000.png"))) == 1 for f in folders)
    records = [json.loads((f / "prompt.json").read_text()) for f in folders]
    assert sorted(r["template"] for r in records) == sorted(alike + ["a {} dog!"])
    assert {r["stage"] for r in records} == {None, 1} and all(r["run"] == str(run.resolve()) for r in records)
    staged = next(f for f, r in zip(folders, records) if r["stage"] == 1)
    png = json.loads(Image.open(staged / "000.png").text["parameters"])
    assert png["stage"] == 1 and png["run"] == str(run.resolve()) and png["template"] == "a {} dog!"


def test_calls_that_differ_in_what_changes_the_pixels_keep_their_own_folders(runs, tmp_path, caplog):
    """A ddim call replaced the dpm++ images and a call with another --seed the first call's, without a word,
    and neither the sampler nor the dtype was recorded. Now each such call has its own folder and records
    them; a repeated call replaces its own folder's images and says so."""
    import logging
    out, base = tmp_path / "o", [str(runs[1]), "--prompt", "a {}", "--num_images", "1", "--steps", "1"]
    variants = [[], ["--scheduler", "ddim"], ["--seed", "7"], ["--steps", "2"], ["--guidance_scale", "3"],
                ["--dtype", "bf16"], ["--height", "32", "--width", "32"], ["--negative_prompt", "blurry"]]
    for extra in variants:
        infer.main([*base, "--out", str(out), *extra])
    folders = sorted(out.iterdir())
    assert len(folders) == len(variants)
    records = [json.loads((f / "prompt.json").read_text()) for f in folders]
    assert {r["scheduler"] for r in records} == {"dpm++", "ddim"} and {r["dtype"] for r in records} == {"fp32", "bf16"}
    png = json.loads(Image.open(folders[0] / "000.png").text["parameters"])
    assert {"scheduler", "dtype", "steps", "guidance_scale", "seed"} <= set(png)
    with caplog.at_level(logging.INFO, logger="infer"):
        infer.main([*base, "--out", str(out)])
    assert len(list(out.iterdir())) == len(variants)
    assert "replacing an earlier call's 3 files there" in caplog.text


def test_second_call_leaves_no_stale_images_and_failure_no_folder(runs, tmp_path, monkeypatch):
    pipe, concept, _ = load_pipe(runs[1])
    out = tmp_path / "samples"
    generate(pipe, concept, ["a {} in the snow"], out, num_images=3, **FAST)
    generate(pipe, concept, ["a {} in the snow"], out, num_images=1, **FAST)
    (folder,) = out.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "grid.png", "prompt.json"]
    monkeypatch.setattr(G, "sample_prompts", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError):
        generate(pipe, concept, ["a {} on the moon"], tmp_path / "never", num_images=1, **FAST)
    assert not (tmp_path / "never").exists()


def test_concept_past_77_tokens_is_warned(runs, tmp_path, caplog):
    pipe, concept, _ = load_pipe(runs[1])
    long = "a photo of a red toy " * 16 + "and {}"
    generate(pipe, concept, [long], tmp_path / "s", num_images=1, **FAST)
    assert "falls past the text encoder's 77 tokens" in caplog.text
    # and where the prompt is cut, in words: the 75 tokens between start and end are what the encoder reads
    ids = pipe.tokenizer(long.replace("{}", concept)).input_ids[1:-1]
    read, cut = pipe.tokenizer.decode(ids[71:75]).strip(), pipe.tokenizer.decode(ids[75:]).strip()
    assert f"it reads up to {read!r}; {cut!r} is cut" in caplog.text and cut.startswith("a red toy") and "and" in cut


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch):
    import attndreambooth.families.source as M

    def unreachable(model_cfg, *a, **k):
        raise OSError(f"{model_cfg.pretrained} does not appear to have a file named model_index.json.\nmore lines")
    monkeypatch.setattr(M, "load_pipeline", unreachable)
    with pytest.raises(SystemExit) as e:
        infer.main(["--base", "nobody/no-such-model", "--prompt", "a photo", "--out", str(tmp_path / "o")])
    assert str(e.value.code) == ("error: the model cannot be loaded: nobody/no-such-model does not appear to have a "
                                 "file named model_index.json.")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])
def test_library_noise_is_silenced_at_its_source_and_only_it(quiet):
    """diffusers' "kept in float32: []" (casting a model that has no such modules) is gone once the tools'
    filter is on, while diffusers' other warnings still print; in a fresh process, both ways."""
    code = ("import logging, torch\n"
            "from attndreambooth.families.source import quiet_known_noise, tiny_model_dir\n"
            f"{'quiet_known_noise()' if quiet else ''}\n"
            "from diffusers import UNet2DConditionModel\n"
            "unet = UNet2DConditionModel.from_pretrained(tiny_model_dir(), subfolder='unet')\n"
            "unet.to(torch.float16)\n"
            "logging.getLogger('diffusers.models.modeling_utils').warning('another warning')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("should be kept in float32: []" in done.stderr) is not quiet
    assert "another warning" in done.stderr
