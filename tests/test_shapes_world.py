"""The shapes world: deterministic scenes, and metrics checked against renders whose answer is known."""
import random

import numpy as np
import pytest

from attndreambooth.shapes import read as R
from attndreambooth.shapes.scene import (BACKGROUNDS, CONCEPTS, OBJECT_COLOURS, POSITIONS, SHAPES, Scene, Thing,
                                         concept_photos, random_scene)


def test_scenes_and_renders_are_deterministic():
    a = [random_scene(random.Random(5)) for _ in range(3)]
    assert a == [random_scene(random.Random(5)) for _ in range(3)]
    scene = Scene(Thing("star", "red"), "small", "left", "blue", Thing("circle", "yellow"))
    assert np.array_equal(np.asarray(scene.render(3)), np.asarray(scene.render(3)))
    assert not np.array_equal(np.asarray(scene.render(3)), np.asarray(scene.render(4)))  # the seed jitters
    assert scene.caption() == "a small red star on the left on a blue background next to a yellow circle"
    assert Scene(Thing("heart", None, "dot_heart"), "big", "centre", "gray").caption("<v>") == \
        "a big <v> heart in the centre on a gray background"


@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_every_attribute_is_read_back_from_its_render(position):
    """Each position (left and right swapped would fail here), and across scenes every shape, colour,
    background, size and second object."""
    rng = random.Random(position)
    for i in range(40):
        scene = random_scene(rng)
        scene = Scene(scene.main, scene.size, position, scene.background, scene.second)
        got = R.describe(scene.render(i))
        main = got["objects"][0] if scene.size == "big" or scene.second is None else None
        if main is not None:
            assert (main["shape"], main["colour"], main["size"], main["position"]) == \
                (scene.main.shape, scene.main.colour, scene.size, position), scene.caption()
        assert got["background"] == scene.background
        score, checks = R.alignment(scene.render(i), scene)
        assert score == 1.0, (scene.caption(), checks)


def test_alignment_counts_what_is_wrong():
    want = Scene(Thing("star", "red"), "big", "left", "blue", Thing("circle", "yellow"))
    image = Scene(Thing("star", "red"), "big", "right", "blue").render(0)  # wrong side, no second object
    score, checks = R.alignment(image, want)
    assert checks == dict(background=True, shape=True, colour=True, size=True, position=False, second=False)
    assert score == pytest.approx(4 / 6)
    other = Scene(Thing("square", "green"), "small", "left", "white").render(0)
    assert R.alignment(other, want)[0] == pytest.approx(1 / 6)  # only the position holds


def test_identity_is_high_for_the_concept_and_low_for_its_category():
    """Held-out renders of each concept (other sizes, positions, backgrounds, jitter) against plain
    instances of its category in every colour."""
    rng = random.Random(0)
    for concept, (category, _) in CONCEPTS.items():
        own = [R.identity(image, concept) for _, image in concept_photos(concept, 8, seed=123)]
        plain = []
        for i, colour in enumerate(OBJECT_COLOURS):
            background = rng.choice([b for b in BACKGROUNDS if b != colour])
            scene = Scene(Thing(category, colour), rng.choice(["small", "big"]), rng.choice(sorted(POSITIONS)), background)
            plain.append(R.identity(scene.render(i), concept))
        assert np.mean(own) >= 0.9, (concept, own)
        assert np.mean(plain) <= 0.2, (concept, plain)
    assert all(s in SHAPES for s, _ in CONCEPTS.values())


def test_captions_parse_back_to_their_scenes():
    from attndreambooth.shapes.score import parse_caption
    rng = random.Random(3)
    for _ in range(100):
        scene = random_scene(rng)
        assert parse_caption(scene.caption()) == scene
    concept = Scene(Thing("star", None, "checker_star"), "big", "left", "blue", Thing("circle", "orange"))
    assert parse_caption(concept.caption("<v>"), "<v>", "checker_star") == concept
    with pytest.raises(ValueError, match="not a caption"):
        parse_caption("a dog on the beach")


def test_attention_share_and_iou_by_hand():
    from attndreambooth.shapes.score import attention_iou, attention_share
    maps = np.zeros((1, 77, 4, 4), np.float32)
    maps[0, 1] = 0.25  # "a"
    maps[0, 2] = 0.75  # "<v>": three quarters of the words' mass
    maps[0, 0] = 5.0  # the start token is not a word
    assert attention_share(maps, ["a", "<v>", "star"], "<v>") == pytest.approx(0.75)
    v_map = np.zeros((4, 4), np.float32)
    v_map[:2, :2] = 1  # the top-left quarter
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True
    assert attention_iou(v_map, mask) == pytest.approx(1.0, abs=0.05)
    assert attention_iou(v_map, ~mask) == pytest.approx(0.0, abs=0.05)


def test_evaluate_world_scores_a_samples_folder(tmp_path):
    """evaluate.py --world shapes on infer.py-style folders of renders with known answers: the concept drawn
    where the caption says scores identity ~1 and text 1; a plain star on the wrong side scores lower."""
    import json

    import evaluate
    right = Scene(Thing("star", None, "checker_star"), "big", "left", "blue")
    wrong = Scene(Thing("star", "red"), "big", "right", "blue")
    for k, (caption_scene, drawn) in enumerate([(right, right), (right, wrong)]):
        folder = tmp_path / "samples" / f"{k:02d}_x"
        folder.mkdir(parents=True)
        for i in range(2):
            drawn.render(i).save(folder / f"{i:03d}.png")
        (folder / "prompt.json").write_text(json.dumps(dict(prompt=caption_scene.caption("<v>"), placeholder="<v>")))
    result = evaluate.main(["--samples", str(tmp_path / "samples"), "--world", "shapes", "--concept", "checker_star",
                            "--out", str(tmp_path / "eval")])
    good, bad = result["prompts"]
    assert good["identity"] > 0.9 and good["text"] == 1.0
    assert bad["identity"] < 0.2 and bad["text"] == pytest.approx(4 / 5)  # the position is wrong
    assert (tmp_path / "eval" / "metrics.md").read_text().count("|") > 10 and (tmp_path / "eval" / "scatter.png").exists()


def test_shipped_model_loads_in_stock_diffusers_and_trains(tmp_path):
    """models/shapes (pretrained here, fp16): stock loading, the SD 2.x layout, and all three stages of the
    trainer through configs/shapes.yaml unchanged."""
    import torch
    from diffusers import StableDiffusionPipeline

    import train_attndreambooth as T
    from conftest import ROOT
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models/shapes", safety_checker=None,
                                                   requires_safety_checker=False)
    assert sum(".attn2." in k for k in pipe.unet.attn_processors) == 16
    from safetensors.torch import load_file
    stored = load_file(ROOT / "models/shapes/unet/diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float16 for t in stored.values()) and pipe.vae_scale_factor == 4  # shipped in fp16
    assert pipe.tokenizer.tokenize("a big red star") == ["a</w>", "big</w>", "red</w>", "star</w>"]
    out = T.main(["--config", str(ROOT / "configs/shapes.yaml"), f"output_dir={tmp_path}/run",
                  f"data.instance_dir={ROOT}/data/shapes/checker_star", f"model.pretrained={ROOT}/models/shapes",
                  "stages.stage1.steps=2", "stages.stage2.steps=2", "stages.stage3.steps=2", "runtime.tensorboard=false",
                  "data.views_per_image=2"])
    assert (out / "finished.json").exists()
    trained = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None, requires_safety_checker=False)
    assert "<v>" in trained.tokenizer.get_added_vocab()


def test_pretraining_is_reproducible_from_its_seed(tmp_path, capsys):
    """The pretraining script twice with one seed (a few steps of each phase): the same weights, bit for bit;
    another seed: other weights."""
    import pretrain_shapes
    files = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]
    small = ["--images", "64", "--vae_steps", "3", "--unet_steps", "3", "--batch", "4", "--vae_batch", "4",
             "--eval_captions", "0"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        pretrain_shapes.main(["--out", str(tmp_path / name), "--seed", str(seed), *small])
    read = lambda name, f: (tmp_path / name / f).read_bytes()  # noqa: E731
    assert all(read("a", f) == read("b", f) for f in files)
    assert all(read("a", f) != read("c", f) for f in files)
    stamp = {f: (tmp_path / "a" / f).stat().st_mtime_ns for f in files}
    (tmp_path / "notes.txt").write_text("x")
    for out, message in ((tmp_path / "a", "already holds a model; choose another folder, or pass --overwrite"),
                         (tmp_path / "notes.txt" / "m", "would be inside")):
        with pytest.raises(SystemExit):  # argparse's one line (its exit status 2), before any training
            pretrain_shapes.main(["--out", str(out), "--seed", "0", *small])
        assert message in capsys.readouterr().err
    assert stamp == {f: (tmp_path / "a" / f).stat().st_mtime_ns for f in files}  # the model is untouched
