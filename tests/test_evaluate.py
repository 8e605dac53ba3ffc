"""Evaluation (CLIP-I / CLIP-T / DINO on tiny random models), baselines and ablations, the sweep."""
import json
import re
import shutil
import statistics

import pytest
import torch
from PIL import Image

import train_attndreambooth as T
from conftest import ROOT, SAMPLE, SHARED, tiny_overrides, script

evaluate = script("evaluate")
sweep = script("sweep")

DREAMBENCH = SHARED / "datasets" / "dreambooth"


@pytest.fixture(scope="module")
def encoders():
    return evaluate.Encoders("tiny", "tiny")


def write_samples(folder, prompts):
    """An infer.py-style samples folder: {prompt: [images]}."""
    for k, (prompt, images) in enumerate(prompts.items()):
        sub = folder / f"{k:02d}"
        sub.mkdir(parents=True)
        for i, im in enumerate(images):
            im.save(sub / f"{i:03d}.png")
        (sub / "prompt.json").write_text(json.dumps({"prompt": prompt, "placeholder": "<v>"}))


def test_identical_images_score_one(encoders, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    photo = Image.open(SAMPLE / "toy_2.jpg").convert("RGB")
    photo.save(real / "a.png")
    write_samples(tmp_path / "samples", {"a <v> toy": [photo, photo]})
    result = evaluate.evaluate(tmp_path / "samples", real, encoders)
    assert result["overall"]["clip_i"] == pytest.approx(1, abs=1e-5)
    assert result["overall"]["dino"] == pytest.approx(1, abs=1e-5)


def test_clip_t_reads_the_prompt_without_placeholder():
    assert evaluate.text_prompt({"prompt": "a <v> dog on the beach", "placeholder": "<v>"}) == "a dog on the beach"
    assert evaluate.text_prompt({"prompt": "a sks_dog in snow", "placeholder": "sks_dog"}) == "a in snow"
    assert evaluate.text_prompt({"prompt": "a <v> dog"}, placeholder="<v>") == "a dog"


def test_bad_arguments_are_one_line_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "Encoders", lambda *a, **k: pytest.fail("a model loaded"))
    write_samples(tmp_path / "samples", {"a <v> toy": [Image.new("RGB", (8, 8))]})
    (tmp_path / "notes.txt").write_text("x")
    ok = {"--samples": str(tmp_path / "samples"), "--real": str(SAMPLE), "--clip": "tiny", "--dino": "tiny"}
    for change, message in (
            ({"--samples": "/no/such"}, "--samples /no/such does not exist"),
            ({"--samples": str(tmp_path)}, f"--samples: {tmp_path} holds no prompt folders"),
            ({"--real": "/no/such"}, "--real /no/such does not exist"),
            ({"--clip": "/no/such"}, "--clip '/no/such' is neither a model folder nor a hub id"),
            ({"--out": str(tmp_path / "notes.txt" / "eval")}, f"--out: {tmp_path / 'notes.txt' / 'eval'} would be inside"),
            ({"--world": "shapes", "--concept": "nope"}, "--concept 'nope' is not one of")):
        args = [x for flag, value in {**ok, **change}.items() for x in (flag, value)]
        with pytest.raises(SystemExit) as e:
            evaluate.main(args)
        assert str(e.value.code).startswith(f"error: {message}"), e.value.code
    assert not (tmp_path / "samples").parent.joinpath("eval").exists()


def test_special_damaged_and_empty_image_folders_are_one_line_naming_the_file(tmp_path, monkeypatch):
    """--real with a named pipe blocked for ever; an empty --real was a ValueError traceback and a truncated
    JPEG an OSError naming no file. Every folder is now read by the trainer's one image check."""
    import os
    monkeypatch.setattr(evaluate, "Encoders", lambda *a, **k: pytest.fail("a model loaded"))
    write_samples(tmp_path / "samples", {"a <v> toy": [Image.new("RGB", (8, 8))]})
    pipe, empty, truncated = tmp_path / "pipe", tmp_path / "empty", tmp_path / "truncated"
    for folder in (pipe, empty, truncated):
        folder.mkdir()
    shutil.copy(SAMPLE / "toy_2.jpg", pipe / "a.jpg")
    os.mkfifo(pipe / "b.jpg")
    (empty / "notes.txt").write_text("not an image")
    data = (SAMPLE / "toy_2.jpg").read_bytes()
    (truncated / "a.jpg").write_bytes(data[:len(data) // 2])
    bad_sample = tmp_path / "samples" / "00" / "001.png"
    for real, message in ((pipe, f"--real: {pipe / 'b.jpg'} is not a regular file (a named pipe"),
                          (empty, f"--real: {empty} holds no images"),
                          (truncated, f"--real: {truncated / 'a.jpg'} cannot be read as an image")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--samples", str(tmp_path / "samples"), "--real", str(real), "--clip", "tiny",
                           "--dino", "tiny"])
        assert str(e.value.code).startswith(f"error: {message}") and "\n" not in str(e.value.code), e.value.code
    bad_sample.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples", str(tmp_path / "samples"), "--real", str(SAMPLE), "--clip", "tiny", "--dino", "tiny"])
    assert str(e.value.code).startswith(f"error: --samples: {bad_sample} cannot be read as an image"), e.value.code


def test_metrics_against_an_independent_computation(encoders, tmp_path):
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLE.iterdir())]
    real = tmp_path / "real"
    real.mkdir()
    for i, im in enumerate(photos[:2]):
        im.save(real / f"{i}.png")
    prompts = {"a <v> toy on the beach": photos[2:4], "a red <v> toy": [photos[4], photos[0].rotate(90)]}
    write_samples(tmp_path / "samples", prompts)
    result = evaluate.evaluate(tmp_path / "samples", real, encoders)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1).item()  # noqa: E731

    def raw(encode, im):  # one image at a time, normalised here, not by the evaluator
        return encode([im])[0]
    want = {}
    for prompt, images in prompts.items():
        text = encoders.clip_texts([prompt.replace("<v> ", "")])[0]
        want[prompt] = dict(
            clip_i=statistics.mean(cos(raw(encoders.clip_images, g), raw(encoders.clip_images, r))
                                   for g in images for r in photos[:2]),
            dino=statistics.mean(cos(raw(encoders.dino_images, g), raw(encoders.dino_images, r))
                                 for g in images for r in photos[:2]),
            clip_t=statistics.mean(cos(raw(encoders.clip_images, g), text) for g in images))
    for p in result["prompts"]:
        assert {k: p[k] for k in want[p["prompt"]]} == pytest.approx(want[p["prompt"]], abs=1e-5)
    for k in ("clip_i", "clip_t", "dino"):
        assert result["overall"][k] == pytest.approx(statistics.mean(w[k] for w in want.values()), abs=1e-5)
    out = tmp_path / "eval"
    evaluate.main(["--samples", str(tmp_path / "samples"), "--real", str(real), "--clip", "tiny", "--dino", "tiny",
                   "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"metrics.json", "metrics.md", "scatter.png"}
    assert "| a toy on the beach | 2 |" in (out / "metrics.md").read_text()


EMB = "embeddings.token_embedding.weight"
# config -> what must change: the [V] row, the cross-attention weights, the rest of the U-Net
CLAIMS = {"baselines/textual_inversion": (True, False, False), "baselines/dreambooth": (False, True, True),
          "baselines/ti_db": (True, True, True), "ablations/no_stage1": (False, True, True),
          "ablations/no_stage2": (True, True, True), "ablations/no_stage3": (True, True, False),
          "ablations/no_reg": (True, True, True)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_baselines_and_ablations_train_what_they_claim(name, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    base = StableDiffusionPipeline.from_pretrained(tiny_dir)
    T.main(["--config", str(ROOT / "configs" / f"{name}.yaml"), "model.pretrained=tiny", "data.resolution=64",
            f"data.instance_dir={SAMPLE}", "data.category=toy",
            *tiny_overrides(tmp_path / "run", **{"stages.stage3.lr": 1e-4, "runtime.tensorboard": "false"})])
    run = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    te = {n.removeprefix("text_model."): t for n, t in run.text_encoder.state_dict().items()}
    init_word = "sks" if name == "baselines/dreambooth" else "toy"
    init = base.text_encoder.get_input_embeddings().weight[base.tokenizer(init_word, add_special_tokens=False).input_ids[0]]
    row_changed = not torch.equal(te[EMB][-1], init)
    a, b = base.unet.state_dict(), run.unet.state_dict()
    attn2_changed = any(not torch.equal(a[k], b[k]) for k in a if ".attn2." in k)
    rest_changed = any(not torch.equal(a[k], b[k]) for k in a if ".attn2." not in k)
    assert (row_changed, attn2_changed, rest_changed) == CLAIMS[name]


def test_sweep_refuses_mistakes_before_writing_anything(tmp_path):
    """Concepts given wrongly, a --set typo, a --set of a key each cell sets itself, a missing folder and an
    --out under a file stop the sweep with one line before it trains or writes anything (a typo used to surface
    only when its first cell trained; a --set output_dir trained outside --out)."""
    toy = f"toy={SAMPLE}:toy"
    (tmp_path / "notes.txt").write_text("x")
    for args, message in (
            (["--concepts", f"toy={SAMPLE}"], f"--concepts 'toy={SAMPLE}': give name=folder:category"),
            (["--concepts", f"{toy},{toy}"], "--concepts: 'toy' is given twice"),
            (["--concepts", toy, "--set", "stages.stage3.stpes=3"], "cell toy / attndreambooth: override "
                                                                   "'stages.stage3.stpes=3': Key 'stpes'"),
            (["--concepts", "toy=/no/such:toy"], "cell toy / attndreambooth: config key 'data.instance_dir': folder "
                                                 "/no/such does not exist"),
            (["--concepts", toy, "--out", str(tmp_path / "notes.txt" / "s")], "--out: "),
            (["--concepts", toy, "--set", f"output_dir={tmp_path}/x"], f"--set output_dir={tmp_path}/x: the sweep sets "
                                                                       "output_dir for each cell (from --out)"),
            (["--concepts", toy, "--set", "data.instance_dir=/tmp"], "--set data.instance_dir=/tmp: the sweep sets "
                                                                     "data.instance_dir for each cell"),
            (["--concepts", toy, "--set", "data.category=dog"], "--set data.category=dog: the sweep sets"),
            (["--concepts", toy, "--set", "runtime.seed=3"], "--set runtime.seed=3: the sweep sets runtime.seed for "
                                                             "each cell (from --seeds)"),
            (["--dreambench", str(tmp_path), "--subjects", "dog"], f"--dreambench {tmp_path} has no prompts_and_classes")):
        with pytest.raises(SystemExit) as e:
            sweep.main([*args, "--set", "model.pretrained=tiny"] + ([] if "--out" in args else ["--out", str(tmp_path / "s")]))
        assert str(e.value.code).startswith(f"error: {message}"), e.value.code
        assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sweep_two_concepts_two_methods_and_resume(tmp_path, capsys):
    if (DREAMBENCH / "prompts_and_classes.txt").is_file():
        where = ["--dreambench", str(DREAMBENCH), "--subjects", "dog,backpack"]
        names = ["backpack", "dog"]
    else:  # a clone without ../shared: the bundled sample, twice
        for n in ("toy_a", "toy_b"):
            shutil.copytree(SAMPLE, tmp_path / n)
        where = ["--concepts", f"toy_a={tmp_path / 'toy_a'}:toy,toy_b={tmp_path / 'toy_b'}:toy"]
        names = ["toy_a", "toy_b"]
    small = [f"--set={k}={v}" for k, v in [("model.pretrained", "tiny"), ("data.resolution", 64),
                                           ("data.views_per_image", 2), ("runtime.tensorboard", "false")]]
    small += [f"--set=stages.stage{i}.{k}={v}" for i in (1, 2, 3) for k, v in (("steps", 2), ("batch_size", 2))]
    args = [*where, "--methods", "attndreambooth,ablations/no_reg", "--num_images", "1", "--infer_args=--steps 2",
            "--clip", "tiny", "--dino", "tiny", "--out", str(tmp_path / "sweep"), *small]
    sweep.main(args)
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    rows = re.findall(r"^\| (\w+) \| ([\w/]+) \|", table, re.M)[1:]  # after the header
    assert sorted(rows) == sorted((c, m) for c in names for m in ("attndreambooth", "ablations/no_reg"))
    assert "**mean of 2** | **attndreambooth**" in table and (tmp_path / "sweep" / "scatter.png").is_file()
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("metrics.json")}
    capsys.readouterr()
    sweep.main(args)
    assert capsys.readouterr().out.count("done before: skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("metrics.json")} == stamp
    # A cell stopped after its training: the rerun samples and scores it, and its timings say the training
    # was resumed (it timed no training), so the report's cost leaves it out.
    cell = tmp_path / "sweep" / names[0] / "attndreambooth"
    timings = {p.parent: json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("timings.json")}
    assert len(timings) == 4 and not any(t["resumed"] for t in timings.values())
    (cell / "eval" / "metrics.json").unlink()
    sweep.main(args)
    again = json.loads((cell / "timings.json").read_text())
    assert again["resumed"] is True and again["train_attndreambooth"] < timings[cell]["train_attndreambooth"]


def test_a_run_resumes_when_finished_or_checkpointed(tmp_path):
    """The sweep's test for a cell's timings: a run folder with a checkpoint the trainer wrote (under
    run/resume/) or a finished.json continues an earlier attempt; an empty or half-written one does not."""
    from attndreambooth.sweep.cells import resumes_a_run
    from attndreambooth.trainer.checkpoint import Checkpointer
    run = tmp_path / "run"
    assert not resumes_a_run(run)
    (run / "resume" / ".tmp-ckpt-000004").mkdir(parents=True)  # a write killed half-way is no checkpoint
    assert not resumes_a_run(run)
    Checkpointer(run, keep=2).save({"x": torch.zeros(2)}, dict(stage="stage1", step=4, global_step=4))
    assert resumes_a_run(run)
    other = tmp_path / "other"
    other.mkdir()
    (other / "finished.json").write_text("{}")
    assert resumes_a_run(other)


@pytest.mark.skipif(not (DREAMBENCH / "prompts_and_classes.txt").is_file(), reason="DreamBench not beside the checkout")
def test_prompt_files_match_dreambench():
    text = (DREAMBENCH / "prompts_and_classes.txt").read_text()
    for name, header in (("dreambench_object", "Object Prompts"), ("dreambench_live", "Live Subject Prompts")):
        block = text[text.index(header):]
        want = [p.replace("{0} {1}", "{}") for p in re.findall(r"'(a [^']*)'\.format", block)][:25]
        got = [l for l in (ROOT / "data" / "prompts" / f"{name}.txt").read_text().splitlines() if not l.startswith("#")]
        assert got == want


def test_evaluate_refuses_a_folder_mixing_stages(tmp_path):
    """infer.py records which run and stage made each prompt folder; a --samples folder holding the final
    model's and stage 1's samples would be scored as one model: refused before any model loads."""
    import json

    evaluate = script("evaluate")
    for name, stage in (("a_v-00000001", None), ("a_v-00000002", 1)):
        (tmp_path / "s" / name).mkdir(parents=True)
        (tmp_path / "s" / name / "prompt.json").write_text(json.dumps(dict(prompt="a <v> toy", run="/r", stage=stage)))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples", str(tmp_path / "s"), "--world", "shapes", "--out", str(tmp_path / "e")])
    assert "holds samples of 2 different models or stages" in str(e.value.code)
    assert not (tmp_path / "e").exists()


def test_evaluate_names_a_corrupt_image_and_a_prompt_outside_the_world(tmp_path):
    """A truncated PNG among the samples, and (with --world shapes) a prompt the world's grammar cannot read:
    one line naming the file, before any model loads (both were tracebacks mid-scoring)."""
    import json

    evaluate = script("evaluate")
    from worlds.shapes.scene import Scene, Thing
    folder = tmp_path / "s" / "a_v-00000001"
    folder.mkdir(parents=True)
    scene = Scene(Thing("star", None, "checker_star"), "big", "left", "blue")
    (folder / "prompt.json").write_text(json.dumps(dict(prompt=scene.caption("<v>"), placeholder="<v>")))
    scene.render(0).save(folder / "000.png")
    (folder / "001.png").write_bytes((folder / "000.png").read_bytes()[:60])
    argv = ["--samples", str(tmp_path / "s"), "--world", "shapes", "--concept", "checker_star", "--out",
            str(tmp_path / "e")]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert f"{folder / '001.png'} cannot be read as an image" in str(e.value.code)
    (folder / "001.png").unlink()
    (folder / "prompt.json").write_text(json.dumps(dict(prompt="a <v> star on the moon", placeholder="<v>")))
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert "is not a caption of the shapes world's grammar" in str(e.value.code) and "prompt.json" in str(e.value.code)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_ctrl_c_on_a_parallel_sweep_ends_every_cell_with_one_line(tmp_path):
    """A SIGINT to the sweep's main process alone (--jobs 2, workers training) did nothing for 9 s, then a
    30-line traceback came from the pool, and no cell's train.log said it was interrupted. Now the workers are
    told, each training logs where it stopped, the sweep ends with one line, and the same command resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    for n in ("toy_a", "toy_b"):
        shutil.copytree(SAMPLE, tmp_path / n)
    out = tmp_path / "s"
    small = [f"--set={k}={v}" for k, v in [("model.pretrained", "tiny"), ("data.resolution", 64),
                                           ("data.views_per_image", 2), ("runtime.tensorboard", "false"),
                                           ("stages.stage1.steps", 2), ("stages.stage2.steps", 2),
                                           ("stages.stage3.steps", 4000), ("runtime.checkpoint_every_steps", 5),
                                           ("runtime.log_every_steps", 1)]]  # stage 3 at once, then interrupted
    command = [sys.executable, str(ROOT / "scripts/sweep.py"), "--concepts",
               f"toy_a={tmp_path / 'toy_a'}:toy,toy_b={tmp_path / 'toy_b'}:toy", "--jobs", "2", "--clip", "tiny",
               "--dino", "tiny", "--out", str(out), *small]
    # SIGINT as in a terminal: a suite started in the background (`cmd &`) hands it on ignored, and Python then
    # installs no KeyboardInterrupt handler
    sweep_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    logs = [out / c / "attndreambooth" / "run" / "train.log" for c in ("toy_a", "toy_b")]
    deadline = time.monotonic() + 300
    try:
        while not all(p.is_file() and "stage3 step" in p.read_text() for p in logs):
            assert sweep_process.poll() is None and time.monotonic() < deadline, sweep_process.communicate()
            time.sleep(1)
        sweep_process.send_signal(signal.SIGINT)  # to the main process alone (its own session: not the workers)
        _, stderr = sweep_process.communicate(timeout=120)
    finally:
        if sweep_process.poll() is None:  # the test failed: leave no training behind
            os.killpg(sweep_process.pid, signal.SIGKILL)
    assert sweep_process.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted; the cells that were training keep")
    for log in logs:
        assert "interrupted in stage3 at step" in log.read_text().splitlines()[-1]
