"""The shapes world: deterministic scenes, and metrics checked against renders whose answer is known."""
import json
import random

import numpy as np
import pytest

from worlds.shapes import read as R
from worlds.shapes.scene import (BACKGROUNDS, CONCEPTS, DESCRIBED, OBJECT_COLOURS, PATTERNS, POSITIONS, SHAPES, Scene, Thing, concept_photos, random_scene)
from conftest import script


def test_scenes_and_renders_are_deterministic():
    a = [random_scene(random.Random(5)) for _ in range(3)]
    assert a == [random_scene(random.Random(5)) for _ in range(3)]
    scene = Scene(Thing("star", "red"), "small", "left", "blue", Thing("circle", "yellow"))
    assert np.array_equal(np.asarray(scene.render(3)), np.asarray(scene.render(3)))
    assert not np.array_equal(np.asarray(scene.render(3)), np.asarray(scene.render(4)))  # the seed jitters
    assert scene.caption() == "a small red star on the left on a blue background next to a yellow circle"
    assert Scene(Thing("heart", None, "dot_heart"), "big", "centre", "gray").caption("<v>") == \
        "a big <v> heart in the centre on a gray background"
    striped = Scene(Thing("star", "orange", pattern="striped", colour2="white"), "big", "left", "blue")
    assert striped.caption() == "a big orange and white striped star on the left on a blue background"
    assert striped.caption(omit=("size", "colour")) == "a striped star on the left on a blue background"
    assert striped.attributes()["pattern"] == "striped" and striped.attributes()["colour"] == {"orange", "white"}
    halved = Scene(Thing("star", "orange", pattern="halved", colour2="white"), "big", "left", "blue")
    assert halved.attributes()["colour"] == ("orange", "white")  # left half first: the order is asked for
    rng = random.Random(0)
    drawn = [random_scene(rng).main for _ in range(600)]
    share = {p: sum(t.pattern == p for t in drawn) / len(drawn) for p in (None,) + PATTERNS}
    assert 0.45 < share[None] < 0.55 and all(0.06 < share[p] < 0.14 for p in PATTERNS), share
    assert all(t.colour != t.colour2 for t in drawn if t.pattern)


def test_pattern_colours_are_where_the_pattern_puts_them():
    """The second colour on the pattern's mask, the first elsewhere: pixels at known unit coordinates of a big
    render (a swap of the mask or of the colours fails here)."""
    from worlds.shapes.scene import COLOURS, POSITIONS as P, RADII
    cx, cy = P["centre"]
    r = RADII["big"]
    probes = {"halved": ((-0.4, 0.1), (0.4, 0.1)), "dotted": ((0.4, 0.3), (0.0, -0.05)),
              "bordered": ((0.0, 0.0), (0.7, 0.0)), "checkered": ((0.25, 0.25), (0.75, 0.25)),
              "striped": ((0.1, 0.1), (0.45, 0.45))}
    for pattern, (first, second) in probes.items():
        image = np.asarray(Scene(Thing("square", "red", pattern=pattern, colour2="blue"), "big", "centre", "black")
                           .render(0), np.float32)
        for (u, v), want in ((first, "red"), (second, "blue")):
            x, y = cx + u * r, cy + v * r  # the render jitters by up to 2 px: the probes sit 4 px inside a part
            got = image[int(y), int(x)]
            assert np.abs(got - COLOURS[want]).max() < 40 or pattern in ("checkered", "striped"), (pattern, u, v, got)


@pytest.mark.slow
@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_every_attribute_is_read_back_from_its_render(position):
    """Each position (left and right swapped would fail here), and across scenes every shape, colour,
    pattern, background, size and second object. Plain objects are read exactly; a pattern on a small
    object has a few pixels, and one reading in a hundred may miss (a small star's border erodes away)."""
    rng = random.Random(position)
    misses, checked = {}, 0
    for i in range(60):
        scene = random_scene(rng)
        scene = Scene(scene.main, scene.size, position, scene.background, scene.second)
        got = R.describe(scene.render(i))
        main = got["objects"][0] if scene.size == "big" or scene.second is None else None
        if main is not None and not scene.main.pattern:
            assert (main["shape"], main["colour"], main["pattern"], main["size"], main["position"]) == \
                (scene.main.shape, scene.main.colour, "plain", scene.size, position), scene.caption()
        assert got["background"] == scene.background
        score, checks = R.alignment(scene.render(i), scene)
        if not scene.main.pattern:
            assert score == 1.0, (scene.caption(), checks)
        for key, ok in checks.items():
            misses[key] = misses.get(key, 0) + (not ok)
        checked += 1
    assert all(m <= 2 for m in misses.values()), misses  # of 60 scenes, about half patterned


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_pattern_is_read_as_itself(pattern):
    """Big patterned objects of every shape, in many colour pairs: the pattern and its colours (in order) are
    read back; reading one pattern as another (e.g. striped for checkered) fails here."""
    rng = random.Random(pattern)
    for i, shape in enumerate(SHAPES * 3):
        background = rng.choice(BACKGROUNDS)
        a, b = rng.sample([c for c in OBJECT_COLOURS if c != background], 2)
        scene = Scene(Thing(shape, a, pattern=pattern, colour2=b), "big", rng.choice(sorted(POSITIONS)), background)
        main = R.describe(scene.render(i))["objects"][0]
        assert main["pattern"] == pattern, (scene.caption(), main["pattern"])
        assert R.alignment(scene.render(i), scene)[0] == 1.0, scene.caption()


def test_alignment_counts_what_is_wrong():
    want = Scene(Thing("star", "red"), "big", "left", "blue", Thing("circle", "yellow"))
    image = Scene(Thing("star", "red"), "big", "right", "blue").render(0)  # wrong side, no second object
    score, checks = R.alignment(image, want)
    assert checks == dict(background=True, shape=True, colour=True, pattern=True, size=True, position=False,
                          second=False)
    assert score == pytest.approx(5 / 7)
    other = Scene(Thing("square", "green"), "small", "left", "white").render(0)
    assert R.alignment(other, want)[0] == pytest.approx(2 / 7)  # only the position and the (plain) pattern hold
    striped = Scene(Thing("star", "red", pattern="striped", colour2="white"), "big", "left", "blue")
    checks = R.alignment(Scene(Thing("star", "red", pattern="checkered", colour2="white"), "big", "left", "blue")
                         .render(0), striped)[1]
    assert checks["pattern"] is False and checks["colour"] is True  # the right colours in the wrong pattern
    checks = R.alignment(image, striped)[1]
    assert checks["pattern"] is False and checks["colour"] is False  # a plain red star


@pytest.mark.slow
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


def test_identity_asks_for_the_colours_too():
    """The concept's pattern in the nearest caption colours scores well below the concept itself (a correlation
    would not: a blue-orange checkerboard correlates 0.91 with the orange-teal one), by the R^2 computed here by
    hand on the concept's own render."""
    from worlds.shapes.scene import COLOURS, pattern_mask
    scene = Scene(Thing("star", None, "checker_star"), "big", "centre", "black")
    own = R.identity(scene.render(0), "checker_star")
    near = Scene(Thing("star", "orange", pattern="checkered", colour2="green"), "big", "centre", "black").render(0)
    got = R.identity(near, "checker_star")
    pattern, a, b = DESCRIBED["checker_star"]
    sse = np.mean([np.sum((np.array(a) - COLOURS["orange"]) ** 2), np.sum((np.array(b) - COLOURS["green"]) ** 2)])
    sst = np.sum((np.array(a) - np.array(b)) ** 2) / 4  # two colours in equal parts
    assert pattern == "checkered" and own > 0.95
    assert got == pytest.approx(1 - sse / sst, abs=0.12) and got < 0.6, got
    assert pattern_mask("checkered", np.array([0.25]), np.array([0.75]))[0]  # odd cells: the second colour


def test_captions_parse_back_to_their_scenes():
    from worlds.shapes.bench import parse_caption
    rng = random.Random(3)
    for _ in range(100):
        scene = random_scene(rng)
        assert parse_caption(scene.caption()) == scene
    assert parse_caption("a red and white striped star") == Scene(Thing("star", "red", pattern="striped",
                                                                        colour2="white"), None, None, None)
    assert parse_caption("a striped star").main == Thing("star", None, pattern="striped")
    for bad in ("a red and striped star", "a red and white star"):
        with pytest.raises(ValueError, match="not a caption"):
            parse_caption(bad)
    concept = Scene(Thing("star", None, "checker_star"), "big", "left", "blue", Thing("circle", "orange"))
    assert parse_caption(concept.caption("<v>"), "<v>", "checker_star") == concept
    with pytest.raises(ValueError, match="not a caption"):
        parse_caption("a dog on the beach")


def test_attention_share_and_iou_by_hand():
    from worlds.scoring import attention_iou, attention_share
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

    evaluate = script("evaluate")
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


@pytest.mark.slow
def test_shipped_model_loads_in_stock_diffusers_and_trains(tmp_path):
    """The first world's model (models/shapes_v1, pretrained here, fp16; models/shapes is the third world's):
    stock loading, the SD 2.x layout, and all three stages of the trainer through configs/shapes.yaml pointed
    at it and at one of its concepts."""
    import torch
    from diffusers import StableDiffusionPipeline

    import train_attndreambooth as T
    from conftest import ROOT
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models/shapes_v1", safety_checker=None,
                                                   requires_safety_checker=False)
    assert sum(".attn2." in k for k in pipe.unet.attn_processors) == 16
    from safetensors.torch import load_file
    stored = load_file(ROOT / "models/shapes_v1/unet/diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float16 for t in stored.values()) and pipe.vae_scale_factor == 4  # shipped in fp16
    assert pipe.tokenizer.tokenize("a big red star") == ["a</w>", "big</w>", "red</w>", "star</w>"]
    out = T.main(["--config", str(ROOT / "configs/shapes.yaml"), f"output_dir={tmp_path}/run",
                  f"data.instance_dir={ROOT}/data/shapes/checker_star", f"model.pretrained={ROOT}/models/shapes_v1",
                  "stages.stage1.steps=2", "stages.stage2.steps=2", "stages.stage3.steps=2", "runtime.tensorboard=false",
                  "data.views_per_image=2"])
    assert (out / "finished.json").exists()
    trained = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None, requires_safety_checker=False)
    assert "<v>" in trained.tokenizer.get_added_vocab()


SMALL = ["--vae_steps", "8", "--unet_steps", "8", "--batch", "4", "--vae_batch", "4", "--chunk", "8", "--vae_chunk",
         "8", "--warmup", "2", "--eval_captions", "0", "--round_trip_scenes", "0"]  # two chunks per phase
FILES = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/model.safetensors"]


@pytest.fixture(scope="module")
def seed0(tmp_path_factory):
    """One uninterrupted small pretraining with seed 0 (the default), shared by the two tests below."""
    from worlds.shapes import __main__ as pretrain_shapes
    out = tmp_path_factory.mktemp("seed0") / "a"
    pretrain_shapes.main(["--out", str(out), "--seed", "0", *SMALL])
    return out


@pytest.mark.slow
def test_pretraining_is_reproducible_from_its_seed(seed0, tmp_path, capsys):
    """The pretraining script twice with one seed (a few steps of each phase): the same weights, bit for bit;
    another seed: other weights."""
    from worlds.shapes import __main__ as pretrain_shapes
    for name, seed in (("b", 0), ("c", 1)):
        pretrain_shapes.main(["--out", str(tmp_path / name), "--seed", str(seed), *SMALL])
    read = lambda path, f: (path / f).read_bytes()  # noqa: E731
    assert all(read(seed0, f) == read(tmp_path / "b", f) for f in FILES)
    assert all(read(seed0, f) != read(tmp_path / "c", f) for f in FILES)
    stamp = {f: (seed0 / f).stat().st_mtime_ns for f in FILES}
    (tmp_path / "notes.txt").write_text("x")
    for argv, message in ((["--out", str(seed0)], "already holds a model; choose another folder, or pass --overwrite"),
                          (["--out", str(tmp_path / "notes.txt" / "m")], "would be inside"),
                          (["--out", str(tmp_path / "d"), "--passes", "0"], "--passes must be at least 1"),
                          (["--out", str(tmp_path / "d"), "--device", "cuda:x" if torch_cuda() else "cuda"],
                           "--device")):
        with pytest.raises(SystemExit):  # argparse's one line (its exit status 2), before any training
            pretrain_shapes.main([*argv, "--seed", "0", *SMALL])
        assert message in capsys.readouterr().err
    assert stamp == {f: (seed0 / f).stat().st_mtime_ns for f in FILES}  # the model is untouched


def torch_cuda():
    import torch
    return torch.cuda.is_available()


@pytest.mark.slow
def test_pretraining_in_pieces_gives_the_uninterrupted_weights(seed0, tmp_path, capsys):
    """Stopped by its time limit after every chunk (VAE, phase change, U-Net) and continued by the same command
    four times: the same bytes as one uninterrupted run. A state made with other options is refused, not
    continued."""
    from worlds.shapes import __main__ as pretrain_shapes
    pieces = ["--out", str(tmp_path / "pieces"), *SMALL, "--time_limit", "0"]
    calls = 0
    while not (tmp_path / "pieces" / "model_index.json").is_file():
        pretrain_shapes.main(pieces)
        calls += 1
        assert calls <= 4
    assert calls == 4  # two chunks of each phase, one per call
    assert all((seed0 / f).read_bytes() == (tmp_path / "pieces" / f).read_bytes() for f in FILES)
    log = (tmp_path / "pieces" / "pretrain.log").read_text()
    assert log.count("continuing") == 3 and "time limit reached; run the same command to continue" in log
    pretrain_shapes.main(["--out", str(tmp_path / "other"), *SMALL, "--time_limit", "0"])  # in the VAE phase
    with pytest.raises(SystemExit):
        pretrain_shapes.main(["--out", str(tmp_path / "other"), *SMALL, "--vae_lr", "1e-4"])
    assert "was made with other options (--vae_lr 0.001)" in capsys.readouterr().err
    # the U-Net phase's options may still change while the VAE trains: the same bytes as a run made with them
    shorter = [a if a != "8" or SMALL[i - 1] != "--unet_steps" else "4" for i, a in enumerate(SMALL)]
    pretrain_shapes.main(["--out", str(tmp_path / "other"), *shorter])
    pretrain_shapes.main(["--out", str(tmp_path / "short"), *shorter])
    assert all((tmp_path / "other" / f).read_bytes() == (tmp_path / "short" / f).read_bytes() for f in FILES)
    pretrain_shapes.main(["--out", str(tmp_path / "late"), *SMALL, "--time_limit", "0"])
    pretrain_shapes.main(["--out", str(tmp_path / "late"), *SMALL, "--time_limit", "0"])  # now in the U-Net phase
    with pytest.raises(SystemExit):
        pretrain_shapes.main(["--out", str(tmp_path / "late"), *shorter])
    assert "was made with other options (--unet_steps 8)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("channels", [6])
def test_any_latent_channel_count_pretrains_trains_samples_and_saves(tmp_path, channels, capsys):
    """A world model with 6 latent channels (neither SD's 4 nor the shipped 8): pretrained, planned, trained
    through all three stages of configs/shapes.yaml, sampled by infer.py with attention maps, and saved as a
    pipeline whose U-Net and VAE agree on the channel count."""
    import json

    from worlds.shapes import __main__ as pretrain_shapes
    import infer
    import train_attndreambooth as T
    from conftest import ROOT
    from diffusers import StableDiffusionPipeline
    model = tmp_path / "model"
    pretrain_shapes.main(["--out", str(model), "--latent_channels", str(channels), *SMALL])
    assert json.loads((model / "vae" / "config.json").read_text())["latent_channels"] == channels
    common = ["--config", str(ROOT / "configs/shapes.yaml"), f"data.instance_dir={ROOT}/data/shapes/checker_star",
              f"model.pretrained={model}", "stages.stage1.steps=2", "stages.stage2.steps=2", "stages.stage3.steps=2",
              "runtime.tensorboard=false", "data.views_per_image=2"]
    T.main([*common, f"output_dir={tmp_path}/plan", "--dry_run"])
    assert "stage3" in capsys.readouterr().out and not (tmp_path / "plan").exists()
    out = T.main([*common, f"output_dir={tmp_path}/run"])
    trained = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None,
                                                      requires_safety_checker=False)
    assert trained.unet.config.in_channels == trained.unet.config.out_channels == channels
    assert trained.vae.config.latent_channels == channels
    infer.main([str(out), "--prompt", "a big {} on the left", "--num_images", "1", "--steps", "2",
                "--attention_maps"])
    folder = next(p for p in (out / "samples").iterdir() if (p / "prompt.json").is_file())
    from PIL import Image
    assert Image.open(folder / "000.png").size == (64, 64)
    assert np.load(folder / "attention_maps.npz")["maps"].shape[-2:] == (16, 16)


def test_shape_words_attention_iou_on_constructed_maps():
    """The report's attention localisation, on maps whose answer is known: each shape word's map is its own
    object's mask (at the 16x16 latent grid) and every other token's is flat, so the main shape word scores
    ~1 with the main object and the second object's word ~1 with the second, found at their token
    positions (the first and the last occurrence of a shape word)."""
    import torch

    from worlds.shapes.model import build
    from worlds.scoring import attention_iou
    from worlds.shapes.world_report import _word_position, pooled
    tokenizer = build()[0]
    scene = Scene(Thing("star", "red", pattern="striped", colour2="white"), "big", "left", "blue",
                  Thing("star", "yellow"))
    caption = scene.caption()
    from worlds.shapes.model import VOCABULARY
    assert [w for w in VOCABULARY if tokenizer.tokenize(w) != [f"{w}</w>"]] == []  # every word one token
    image = scene.render(0)
    main, second = R.match_objects(R.describe(image), scene.attributes())
    maps = torch.full((77, 16, 16), 0.01)
    first, last = _word_position(tokenizer, caption, "star"), _word_position(tokenizer, caption, "star", last=True)
    assert (first, last) == (7, len(caption.split()))  # after the start token: a big red and white striped star
    for pos, obj in ((first, main), (last, second)):
        down = torch.nn.functional.avg_pool2d(torch.tensor(obj["blob"].mask, dtype=torch.float32)[None, None], 4)
        maps[pos] = down[0, 0]
        assert np.allclose(pooled(obj["blob"].mask, (16, 16)), maps[pos].numpy())  # the report's ceiling map
    assert attention_iou(maps[first].numpy(), main["blob"].mask) > 0.7  # a 16x16 map of a 64 px mask: ~0.77 at best
    assert attention_iou(maps[last].numpy(), second["blob"].mask) > 0.5  # a small object, 4 px a cell
    assert attention_iou(maps[first].numpy(), second["blob"].mask) == 0.0  # the main word is not on the second


def test_the_second_worlds_published_numbers_are_its_report():
    """docs/reports/shapes_overview.md's and shapes_world.md's figures for the second world's model are its report's."""
    from conftest import ROOT
    report = json.loads((ROOT / "docs" / "reports" / "shapes_v2" / "report.json").read_text())
    acc, iou = report["eval"]["accuracy"], report["eval"]["attention_iou"]
    pct = lambda key: f"{100 * acc[key]:g} %"  # noqa: E731
    row = (f"| measured | {' | '.join(pct(k) for k in ('background', 'shape', 'colour', 'pattern', 'position', 'second'))}"
           f" | {iou['main']:.2f} (ceiling {iou['ceiling']:.2f}) |")
    assert row in (ROOT / "docs" / "reports" / "shapes_overview.md").read_text()
    docs = (ROOT / "docs" / "reports" / "shapes_world.md").read_text()
    for line, key in (("| background | 63.5 % |", "background"), ("| shape | 23 % |", "shape"),
                      ("| position | 26 % |", "position"), ("| second object | 67 % |", "second")):
        assert f"{line} {pct(key)} |" in docs
    trip = report["vae_round_trip"]["identity"]
    assert " / ".join(f"{trip[c]:.2f}" for c in ("checker_star", "split_circle", "dot_heart", "stripe_square")) in docs
    assert f"{report['train_seconds']:,} s" in docs
