"""The third shapes world as a world of the comparison (worlds.load("shapes3")): its captions parsed back, its
benchmark prompts, its photos, and scoring and the VAE ceiling by its own readers, not the first world's."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, script
from worlds import load
from worlds.shapes3.gates import held_out_scenes
from worlds.shapes3.scene import CONCEPTS, Scene, Thing, concept_photos

THIRD, FIRST = load("shapes3"), load("shapes")


def test_captions_parse_back_to_their_scenes_with_what_they_leave_out_unset():
    rng = random.Random(3)
    for scene in held_out_scenes(300, seed=4):  # plain, patterned and appearance-word objects
        omit = tuple(k for k in ("size", "position", "background") if rng.random() < 0.3)
        want = Scene(scene.main, *(None if k in omit else getattr(scene, k) for k in ("size", "position",
                                                                                     "background")), scene.second)
        assert THIRD.parse_caption(scene.caption(omit=omit)) == want, scene.caption(omit=omit)
    assert THIRD.parse_caption("a striped star").main == Thing("star", pattern="striped")  # colours unsaid
    assert THIRD.parse_caption("a big <v> heart in the centre on a gray background", "<v>", "dot_heart") == \
        Scene(Thing("heart", concept="dot_heart"), "big", "centre", "gray")
    assert THIRD.parse_caption("a big star on the left", concept="checker_star").main.concept == "checker_star"
    jester = THIRD.parse_caption("a big jester circle", concept="split_circle")
    assert jester.main == Thing("circle", appearance="jester")
    for bad in ("a red striped star", "a red and white star", "a harlequin red star", "a dog on the beach"):
        with pytest.raises(ValueError, match="third shapes world"):
            THIRD.parse_caption(bad)


def test_benchmark_prompts_are_the_concepts_scenes_held_out_and_repeatable():
    from worlds.comparison import bench_prompts
    for concept, (category, *_) in CONCEPTS.items():
        prompts = bench_prompts(THIRD, concept)
        assert prompts == bench_prompts(THIRD, concept) and len(set(prompts)) == 20
        scenes = [THIRD.parse_caption(p.replace("{}", f"<v> {category}"), "<v>", concept) for p in prompts]
        assert all(s.main == Thing(category, concept=concept) for s in scenes)
        assert [s.size for s in scenes[:6]] == [None, None, None, None, scenes[4].size, None]  # one attribute each
        assert all(s.size and s.position and s.background for s in scenes[6:])  # then full captions
    assert bench_prompts(THIRD, "checker_star") != bench_prompts(FIRST, "checker_star")  # the third world's scenes


def test_the_shipped_photos_are_the_concepts_renders():
    for concept in CONCEPTS:
        files = sorted((THIRD.DATA / concept).glob("*.png"))
        assert len(files) == 5
        for f, (_, image) in zip(files, concept_photos(concept, 5)):
            assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), np.asarray(image))


def test_samples_are_scored_by_the_third_worlds_readers(tmp_path):
    """A samples folder as infer.py writes it, its images the concept's own renders: identity and text
    alignment are the third world's readers' (recomputed here), not the first world's."""
    from worlds.scoring import score_samples
    from worlds.shapes3.read import alignment, identity
    rng = random.Random(0)
    for concept in ("checker_star", "dot_heart"):
        category = CONCEPTS[concept][0]
        folder = tmp_path / concept / "samples" / "000"  # one samples folder a concept, as infer.py writes it
        folder.mkdir(parents=True)
        scene = Scene(Thing(category, concept=concept), "big", rng.choice(["left", "centre"]), "gray")
        template = scene.caption("{}").replace("{} " + category, "{}")
        (folder / "prompt.json").write_text(json.dumps(dict(prompt=template.format(f"<v> {category}"),
                                                            template=template, placeholder="<v>")))
        images = [scene.render(seed) for seed in range(2)]
        for i, image in enumerate(images):
            image.save(folder / f"{i:03d}.png")
        got = score_samples(THIRD, folder.parent, concept)
        assert got["world"] == "shapes3"
        assert got["overall"]["identity"] == pytest.approx(np.mean([identity(im, concept) for im in images]), abs=1e-6)
        assert got["overall"]["identity"] > 0.95
        assert got["overall"]["text"] == np.mean([alignment(im, scene)[0] for im in images]) == 1.0
        first = score_samples(FIRST, folder.parent, concept)["overall"]["identity"]
        assert first < 0.6  # the first world's concept of that name is another pattern


def test_the_vae_ceiling_reads_the_worlds_own_photos_with_its_own_reader(tmp_path, monkeypatch):
    """With a VAE that gives the photos back unchanged, the ceiling is the mean identity of the world's own
    photos: near 1 by the third world's reader, far lower by the first world's for the same names."""
    from worlds import comparison
    from worlds.shapes import world_report
    monkeypatch.setattr(comparison, "_base_pipe", lambda *a: type("Pipe", (), {"vae": None}))
    monkeypatch.setattr(world_report, "round_trip", lambda vae, images: images)
    photos = {"dot_heart": THIRD.DATA / "dot_heart"}
    got = comparison.write_vae_ceiling(THIRD, tmp_path, photos, "unused")
    for c, value in got.items():
        want = np.mean([THIRD.identity(Image.open(f).convert("RGB"), c) for f in sorted(photos[c].glob("*.png"))])
        assert value == pytest.approx(want) and value > 0.99
    assert json.loads((tmp_path / "vae_ceiling.json").read_text()) == got
    (tmp_path / "first").mkdir()
    other = comparison.write_vae_ceiling(FIRST, tmp_path / "first", photos, "unused")
    assert other["dot_heart"] < 0.3


def test_a_sweep_of_the_third_world_without_its_model_is_refused_in_one_line(tmp_path, capsys):
    none = tmp_path / "none"
    with pytest.raises(SystemExit) as stop:
        script("sweep").main(["--world", "shapes3", "--base_model", str(none), "--out", str(tmp_path / "s"),
                              "--dry_run"])
    assert str(stop.value).count("\n") == 0 and str(stop.value).startswith(f"error: --base_model {none}: ")
    assert "python -m worlds.shapes3 --out DIR" in str(stop.value)
    first = str(FIRST.MODEL)  # the first world's model has no token for the third world's appearance words
    with pytest.raises(SystemExit, match=r"^error: --base_model .*no token for the shapes3 world's words harlequin"):
        script("sweep").main(["--world", "shapes3", "--base_model", first, "--out", str(tmp_path / "s"), "--dry_run"])
    assert not (tmp_path / "s").exists()
    assert script("sweep").unknown_words(FIRST, first) == []



def test_a_worlds_sweep_samples_its_own_steps_unless_told(tmp_path, monkeypatch, capsys):
    """--sampler_steps defaults to the world's (the third world's appearance colours need 25; the first world's
    comparisons ran 15) and an explicit value wins; what the protocol records is what the cells sample."""
    sweep, seen = script("sweep"), []
    monkeypatch.setattr(sweep, "check_protocol", lambda args: seen.append(args.sampler_steps) or {})
    for world, extra in (("shapes3", []), ("shapes", []), ("shapes3", ["--sampler_steps", "7"])):
        sweep.main(["--world", world, "--out", str(tmp_path / world), "--dry_run", *extra])
    assert seen == [THIRD.SAMPLER_STEPS, FIRST.SAMPLER_STEPS, 7] == [25, 15, 7]

@pytest.fixture(scope="module")
def untrained_third_model(tmp_path_factory):
    """A third-world pipeline folder with fresh weights, saved as `python -m worlds.shapes3` saves one."""
    import torch

    from attndreambooth.families.source import save_pipeline
    from worlds.shapes.model import assemble_pipeline
    from worlds.shapes3.model import build
    folder = tmp_path_factory.mktemp("shapes3_model")
    tokenizer, text_encoder, vae, unet, scheduler = build(0)
    save_pipeline(assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler), folder, torch.float16)
    return folder


@pytest.mark.slow
def test_a_third_world_sweep_trains_from_its_model_and_scores_by_its_readers(untrained_third_model, tmp_path,
                                                                             monkeypatch):
    """One concept, Textual Inversion for a few steps on an untrained third-world model, in this process: the
    floor caption is one of the third world's (one image a caption here, not 8), the training starts from
    --base_model, the cells are scored by the third world's readers (recomputed here from an image), and the
    report is written."""
    import functools

    from worlds.shapes3.bench import caption_floor, floor_captions
    monkeypatch.setattr(THIRD, "caption_floor", functools.partial(caption_floor, n=1))
    out = tmp_path / "s"
    results = script("sweep").main([
        "--world", "shapes3", "--base_model", str(untrained_third_model), "--concepts", "dot_heart", "--seeds", "0",
        "--methods", "shapes/textual_inversion", "--num_prompts", "2", "--num_images", "1", "--sampler_steps", "2",
        "--step_scale", "0.01", "--out", str(out)])
    assert set(results) == {("dot_heart", m, s) for m, s in (("reference", None), ("floor", None),
                                                              ("shapes/textual_inversion", 0))}
    floor = json.loads((out / "floor_captions.json").read_text())["dot_heart"]
    assert floor["caption"] in floor_captions("dot_heart") and set(floor["captions tried"]) == set(floor_captions("dot_heart"))
    cell = out / "dot_heart" / "shapes_textual_inversion" / "seed_0"
    config = (cell / "run" / "config.yaml").read_text()
    assert f"pretrained: {untrained_third_model}" in config
    metrics = json.loads((cell / "eval" / "metrics.json").read_text())
    assert metrics["world"] == "shapes3"
    first = sorted(p for p in (cell / "samples").iterdir() if p.is_dir())[0]
    image = Image.open(first / "000.png").convert("RGB")
    scene = THIRD.parse_caption(json.loads((first / "prompt.json").read_text())["template"].replace("{}", "<v> heart"),
                                "<v>", "dot_heart")
    assert metrics["prompts"][0]["text"] == THIRD.alignment(image, scene)[0]
    assert metrics["prompts"][0]["identity"] == pytest.approx(THIRD.identity(image, "dot_heart"))
    table = (out / "comparison.md").read_text().split("\n\n")[0]
    assert table.count("| textual_inversion | 1 |") == 1 and table.count("| base model, best caption | 1 |") == 1


@pytest.mark.slow
def test_the_shipped_model_is_the_third_worlds_and_configs_shapes_trains_it_unchanged(tmp_path, monkeypatch):
    """models/shapes is the third world's model (fp16, at most ~30 MB, stock loading, the SD 2.x layout with 16
    attn2 layers, a token for every appearance word), and configs/shapes.yaml trains one of its concepts
    through all three stages with only the step counts and the output folder changed."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    import train_attndreambooth as T
    assert THIRD.MODEL == ROOT / "models" / "shapes"
    files = [p for p in THIRD.MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 31e6
    assert all(t.dtype == torch.float16 for p in files if p.suffix == ".safetensors" for t in load_file(p).values())
    pipe = StableDiffusionPipeline.from_pretrained(THIRD.MODEL, safety_checker=None, requires_safety_checker=False)
    assert sum(".attn2." in k for k in pipe.unet.attn_processors) == 16 and pipe.vae.config.latent_channels == 8
    assert script("sweep").unknown_words(THIRD, THIRD.MODEL) == []
    monkeypatch.chdir(ROOT)  # the config's paths are the repository's, as the README runs it
    out = T.main(["--config", str(ROOT / "configs/shapes.yaml"), f"output_dir={tmp_path}/run",
                  "stages.stage1.steps=2", "stages.stage2.steps=2", "stages.stage3.steps=2",
                  "runtime.tensorboard=false", "data.views_per_image=2"])
    config = (out / "config.yaml").read_text()
    assert "pretrained: models/shapes\n" in config and "instance_dir: data/shapes3/checker_star\n" in config
    trained = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None,
                                                      requires_safety_checker=False)
    assert "<v>" in trained.tokenizer.get_added_vocab()
