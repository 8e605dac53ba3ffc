"""The comparison's parts in the shapes world: short captions, the held-out prompts, the statistics, the
base model's reference through infer.py, and the patterned scenes the VAE learns from."""
import random
import re
import shutil
import statistics

import numpy as np
import pytest

from worlds.shapes import read as R
from worlds.comparison import bench_prompts, paired_differences, per_concept, summarise, table
from worlds.stats import T975, holm, mean_ci, sign_flip_p
from worlds.shapes.scene import CONCEPTS, OMITTABLE, Scene, Thing, random_scene
from worlds.shapes import bench as FIRST
from worlds.shapes.bench import parse_caption
from conftest import ROOT, script


def test_short_captions_parse_back_with_the_left_out_attributes_unset():
    rng = random.Random(7)
    for _ in range(200):
        scene = random_scene(rng)
        omit = [a for a in OMITTABLE if rng.random() < 0.5]
        got = parse_caption(scene.caption(omit=omit))
        m, said = scene.main, "colour" not in omit
        want = Scene(Thing(m.shape, m.colour if said else None, pattern=m.pattern, colour2=m.colour2 if said else None),
                     None if "size" in omit else scene.size, None if "position" in omit else scene.position,
                     None if "background" in omit else scene.background, scene.second)
        assert got == want, scene.caption(omit=omit)
    assert Scene(Thing("heart", "orange"), "big", "left", "blue").caption(omit=["size"]).startswith("an orange heart")
    # a category without a colour stands for the concept (the base model's reference prompt)
    assert parse_caption("a big star on the left", concept="checker_star").main == Thing("star", None, "checker_star")


def test_alignment_asks_only_for_what_the_caption_says():
    image = Scene(Thing("star", "red"), "big", "left", "blue").render(0)
    full = Scene(Thing("star", "red"), "big", "left", "green")  # wrong background
    assert R.alignment(image, full)[1]["background"] is False
    short = parse_caption("a red star on the left")  # background and size unsaid
    score, checks = R.alignment(image, short)
    assert score == 1.0 and set(checks) == {"shape", "colour", "pattern", "position", "second"}  # "red": plain
    assert R.alignment(image, parse_caption("a red star on the right"))[0] == pytest.approx(4 / 5)
    assert set(R.alignment(image, parse_caption("a star"))[1]) == {"shape", "second"}  # no colour: no pattern asked


def test_bench_prompts_are_held_out_single_then_combined_attributes():
    for concept, (category, _) in CONCEPTS.items():
        prompts = bench_prompts(FIRST, concept)
        assert prompts == bench_prompts(FIRST, concept) and len(set(prompts)) == 20
        scenes = [parse_caption(p.replace("{}", f"<v> {category}"), "<v>", concept) for p in prompts]
        assert all(s.main.concept == concept for s in scenes)
        named = [sum(x is not None for x in (s.size, s.position, s.background, s.second)) for s in scenes]
        assert named[:6] == [1] * 6, prompts[:6]  # background, background, position, position, size, second
        assert all(n >= 3 for n in named[6:])
        assert sum(s.second is not None for s in scenes[6:]) >= 2


def test_sign_flip_p_and_holm_by_hand():
    """Three positive pairs: of the 8 sign patterns only all-plus and all-minus reach the observed mean,
    p = 2/8; a mixed set counts its ties. Holm at 5 % over four p-values: 0.005 x 4 and 0.01 x 3 pass,
    0.03 x 2 = 0.06 fails and stops 0.04 too."""
    assert sign_flip_p([1, 2, 3]) == 0.25
    assert sign_flip_p([1, -1, 2]) == 6 / 8  # all but the two patterns that cancel to 0 (+--, -++)
    want = sum(abs(a * 1 + b * -1 + c * 2) / 3 >= 2 / 3 - 1e-12 for a in (1, -1) for b in (1, -1) for c in (1, -1)) / 8
    assert sign_flip_p([1, -1, 2]) == want
    assert sign_flip_p([0, 0]) == 1.0 and sign_flip_p([]) == 1.0
    assert sign_flip_p([0.1] * 12) == 2 / 4096  # the smallest p 12 pairs can give
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}) == {"d": True, "a": True, "c": False, "b": False}
    assert holm({"a": 0.2}) == {"a": False} and holm({"a": 0.05}) == {"a": True}


def test_cost_by_hand_leaves_out_resumed_cells():
    """Median seconds per part and per cell over a method's cells (a paused cell does not move it); a resumed
    cell (it timed only what it redid) is left out, and a method with nothing else has no row."""
    from worlds.comparison import UNRECORDED, cost
    t = lambda train, infer, ev, resumed=False: dict(train_attndreambooth=train, infer=infer, evaluate=ev,  # noqa
                                                     processes="this one", resumed=resumed)
    costs = cost({("a", "m", 0): t(100, 20, 10), ("b", "m", 0): t(200, 30, 20), ("a", "m", 1): t(4, 25, 9, True),
                  ("c", "m", 0): t(1500, 40, 12), ("c", "m", 1): t(150, 10, 30),  # the first paused 20 min
                  ("a", "n", 0): t(3, 20, 10, True), ("a", "old", 0): {"train_attndreambooth": 7, "infer": 1}})
    assert costs == {UNRECORDED: {"m": dict(cells=4, train_attndreambooth=175, infer=25, evaluate=16, total=220),
                                  "old": dict(cells=1, train_attndreambooth=7, infer=1, evaluate=0.0, total=8)}}
    on = lambda machine, *a: dict(t(*a), machine=machine)  # noqa: E731
    costs = cost({("a", "m", 0): on("x", 100, 20, 10), ("b", "m", 0): on("y", 200, 30, 20),
                  ("c", "m", 0): on("y", 300, 10, 10)})  # two machines: never one median over both
    assert costs == {"x": {"m": dict(cells=1, train_attndreambooth=100, infer=20, evaluate=10, total=130)},
                     "y": {"m": dict(cells=2, train_attndreambooth=250, infer=20, evaluate=15, total=285)}}


def test_sampler_agreement_spreads_its_cells_over_concepts(tmp_path):
    """The k-th method starts at its k-th finished cell, so a few cells reach several concepts."""
    chosen_cells = script("sampler_agreement").chosen_cells
    for concept in ("a", "b", "c"):
        for method in ("m1", "m2", "m3"):
            (tmp_path / concept / method / "seed_0" / "eval").mkdir(parents=True)
            (tmp_path / concept / method / "seed_0" / "eval" / "metrics.json").write_text("{}")
        (tmp_path / concept / "reference" / "eval").mkdir(parents=True)
        (tmp_path / concept / "reference" / "eval" / "metrics.json").write_text("{}")
    (tmp_path / "b" / "m2" / "seed_0" / "eval" / "metrics.json").unlink()  # not finished
    assert chosen_cells(tmp_path, 5) == [("a", "m1", 0), ("c", "m2", 0), ("c", "m3", 0), ("a", "reference", None),
                                         ("b", "m1", 0)]


def test_mean_ci_by_hand():
    values = [0.2, 0.4, 0.5, 0.9]
    mean, half = mean_ci(values)
    sd = np.sqrt(sum((v - 0.5) ** 2 for v in values) / 3)  # sample standard deviation, by hand
    assert mean == pytest.approx(0.5) and half == pytest.approx(3.182 * sd / 2, rel=1e-4)  # t(3) = 3.182
    assert mean_ci([0.3]) == (0.3, 0.0)
    assert T975[10] == 2.201  # t(11), the 12 cells of 4 concepts x 3 seeds
    cells = {("a", "m", 0): dict(identity=0.1, text=1.0), ("b", "m", 0): dict(identity=0.3, text=0.5),
             ("a", "r", None): dict(identity=0.0, text=0.9)}
    s = summarise(cells)
    assert s["m"]["n"] == 2 and s["m"]["identity"][0] == pytest.approx(0.2)
    assert s["m"]["text"][1] == pytest.approx(12.706 * statistics.stdev([1.0, 0.5]) / np.sqrt(2))
    cells[("b", "m", 1)] = dict(identity=0.5, text=0.5)
    cells[("b", "r", None)] = dict(identity=0.1, text=0.7)
    cells[("b", "n", 1)] = dict(identity=0.2, text=0.9)  # pairs with m's seed 1 only
    d = paired_differences(cells, against="m")
    assert d["n"]["n"] == 1 and d["n"]["identity"] == pytest.approx((0.3, 0.0))
    assert d["n"]["text"][0] == pytest.approx(-0.4)
    # the reference pairs by concept with every seed of m: a 0.1-0.0, b seed 0 0.3-0.1, b seed 1 0.5-0.1
    assert d["r"]["n"] == 3 and d["r"]["identity"] == pytest.approx(mean_ci([0.1, 0.2, 0.4]))
    assert per_concept(cells).splitlines()[3] == "| b | 0.400 / 0.500 | 0.100 / 0.700 | 0.200 / 0.900 |"
    rows = table(s).splitlines()
    # 12.706 x stdev / sqrt(2): stdev 0.1414 (identity), 0.3536 (text)
    assert rows[2] == "| m | 2 | 0.200 ± 1.271 | 0.750 ± 3.176 | n/a | n/a |"
    assert rows[3] == "| r | 1 | 0.000 ± n/a | 0.900 ± n/a | n/a | n/a |"  # one cell: no interval


def test_patterned_vae_scenes_are_deterministic_and_varied():
    from worlds.shapes.textures import random_textured_image
    a = [random_textured_image(random.Random(4)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    images = [random_textured_image(random.Random(i)) for i in range(30)]
    colours = [len(np.unique(im.reshape(-1, 3), axis=0)) for im in images]
    assert min(colours) >= 2 and max(colours) > 50  # flat objects and patterns (plus anti-aliased edges)


def test_every_view_of_a_world_photo_is_the_photo_itself():
    """Why the comparison runs no view-pool arm (views_per_image 16 against the released code's fresh view per
    step): with the world's config (64 px photos trained at 64 px, no rotation, no flip) every augmented view
    is the photo, pixel for pixel, so a pool of views and a fresh one per step are the same data."""
    from PIL import Image

    from worlds.shapes.bench import DATA
    from attndreambooth.config.loading import load_config
    from attndreambooth.trainer.data import augmented_view, list_images, load_rgb
    for concept in CONCEPTS:
        cfg = load_config(ROOT / "configs/shapes/attndreambooth.yaml", [f"data.instance_dir={DATA / concept}",
                                                                         "output_dir=unused"], check=False).data
        rng = random.Random(0)
        for path in list_images(cfg):
            photo = load_rgb(path, cfg.alpha_background, 2 * cfg.resolution)
            views = [augmented_view(photo, cfg.resolution, cfg.augment, rng)[0] for _ in range(cfg.views_per_image)]
            assert all(np.array_equal(np.asarray(v), np.asarray(Image.open(path).convert("RGB"))) for v in views)


def test_a_method_with_the_prior_shares_its_class_images_per_category(tmp_path):
    """DreamBooth with prior preservation takes OUT/class_images/<category>/ (made once for all its cells);
    a method without it is given no such key. Every cell trains from the world's base model: a config naming
    another is pointed at it, one naming it is left as written."""
    from types import SimpleNamespace

    from attndreambooth.sweep.cells import cell_commands
    args = SimpleNamespace(world="shapes", out=str(tmp_path), num_images=2, sampler_steps=3, sampler_batch=4,
                           infer_args="", set=[], step_scale=1, base_model=str(ROOT / "models" / "shapes_v1"))
    first = [f"model.pretrained={ROOT / 'models' / 'shapes_v1'}"]  # configs/shapes/ name models/shapes, the third's
    for method, want in (("shapes/dreambooth_prior", [f"prior.class_dir={tmp_path / 'class_images' / 'star'}"]),
                         ("shapes/dreambooth", [])):
        (train, argv), *_ = cell_commands("checker_star", "photos", "star", method, 0, args, tmp_path / "cell")
        assert train == "train_attndreambooth.py" and [a for a in argv if str(a).startswith("prior.")] == want
        assert [a for a in argv if str(a).startswith("model.")] == first
    args.world, args.base_model = "shapes3", str(ROOT / "models" / "shapes")
    steps = cell_commands("checker_star", "photos", "star", "shapes/attndreambooth", 0, args, tmp_path / "cell")
    assert not [a for a in steps[0][1] if str(a).startswith("model.")]  # the config's own model, left as written
    args.base_model = str(tmp_path / "third")
    steps = cell_commands("checker_star", "photos", "star", "shapes/attndreambooth", 0, args, tmp_path / "cell")
    assert [a for a in steps[0][1] if str(a).startswith("model.")] == [f"model.pretrained={tmp_path / 'third'}"]
    assert steps[2][1][steps[2][1].index("--world") + 1] == "shapes3"  # scored by that world's readers


def test_a_per_concept_file_keeps_its_entries_and_measures_damaged_ones_again(tmp_path):
    """The floor captions' and VAE ceiling's file: what is there is kept, only what is missing, refused or in
    a damaged file is measured, and the file is replaced whole (no part file left)."""
    from worlds.comparison import per_concept_file
    path, asked = tmp_path / "f.json", []

    def measure(todo):
        asked.append(todo)
        return {c: len(c) / 10 for c in todo}
    number = lambda e: isinstance(e, float)  # noqa: E731
    path.write_text('{"ab": 0.5, "abc": "high", "other": 0.1}')
    assert per_concept_file(path, ["ab", "abc", "abcd"], measure, number) == {"ab": 0.5, "abc": 0.3, "abcd": 0.4}
    assert asked == [["abc", "abcd"]]
    assert per_concept_file(path, ["ab", "abcd"], measure, number) == {"ab": 0.5, "abcd": 0.4} and len(asked) == 1
    for damaged in ('{"ab": 0.5', '["ab"]'):
        path.write_text(damaged)
        assert per_concept_file(path, ["ab"], measure, number) == {"ab": 0.2} and asked[-1] == ["ab"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_the_vae_ceiling_of_a_concept_is_what_the_rerun_published(tmp_path):
    import json

    from worlds.comparison import write_vae_ceiling
    from worlds.shapes.bench import DATA
    got = write_vae_ceiling(FIRST, tmp_path, {"split_circle": DATA / "split_circle"}, ROOT / "models" / "shapes_v1")
    published = json.loads((ROOT / "docs" / "reports" / "shapes_results_r2" / "vae_ceiling.json").read_text())
    assert got["split_circle"] == pytest.approx(published["split_circle"], abs=1e-3)  # another CPU may differ
    #   in a convolution's last bits


def test_infer_on_a_base_model_alone(tiny_dir, tmp_path, monkeypatch):
    """--base without --embeds: the base model, {} the category word; a {} without a category is refused
    before any weight loads."""
    import json

    import infer
    from attndreambooth.families import source as models
    out = infer.main(["--base", str(tiny_dir), "--category", "dog", "--prompt", "a {} on the beach",
                      "--prompt", "a red cat", "--num_images", "2", "--steps", "2", "--out", str(tmp_path / "s")])
    assert list(out) == ["a dog on the beach", "a red cat"]
    record = json.loads(next((tmp_path / "s").glob("a_v_on_the_beach-*/prompt.json")).read_text())
    assert record["prompt"] == "a dog on the beach" and record["placeholder"] is None
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit, match="give --category"):
        infer.main(["--base", str(tiny_dir), "--prompt", "a {} on the beach"])


@pytest.mark.slow
def test_sweep_slots(monkeypatch):
    """--jobs shares the cores out between subprocesses; one job runs in this process; GPUs one cell each."""
    import argparse

    sweep = script("sweep")

    from attndreambooth.sweep import local
    monkeypatch.setattr(local.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(local.torch.cuda, "device_count", lambda: 0)
    assert local.slots(argparse.Namespace(gpus=None, jobs=None)) == [None]
    assert local.slots(argparse.Namespace(gpus=None, jobs=3)) == [{"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}] * 3
    gpus = local.slots(argparse.Namespace(gpus="1,3", jobs=4))
    assert gpus == [{"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "3"}]
    with pytest.raises(SystemExit):
        sweep.main(["--world", "shapes", "--out", "unused", "--jobs", "0"])


def test_publish_refuses_a_folder_or_record_that_is_a_file_before_anything_runs(tmp_path):
    sweep = script("sweep")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "sweep").write_text("")  # where the record would go
    (tmp_path / "file").write_text("")
    for publish, said in ((tmp_path / "report", f"{tmp_path / 'report' / 'sweep'} is a file; give a folder"),
                          (tmp_path / "file", f"would be inside {tmp_path / 'file'}, which is a file")):
        with pytest.raises(SystemExit, match=re.escape(said)):
            sweep.main(["--world", "shapes", "--out", str(tmp_path / "out"), "--publish", str(publish)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "report"]  # no --out made


@pytest.mark.slow
def test_world_sweep_end_to_end(tmp_path, capsys):
    """A reduced comparison (one concept, one seed, two methods, a few steps, two prompts) through the one
    command: every cell's metrics are read from its images, the report has its parts, a rerun skips."""
    import json

    sweep = script("sweep")
    args = ["--world", "shapes", "--concepts", "split_circle", "--seeds", "0", "--out", str(tmp_path / "s"),
            "--methods", "shapes/attndreambooth,shapes/textual_inversion", "--num_prompts", "7", "--num_images", "1",
            "--sampler_steps", "4", "--step_scale", "0.02", "--set", "data.views_per_image=2", "--jobs", "2",
            "--publish", str(tmp_path / "docs")]
    (tmp_path / "s").mkdir()  # a first try that finished no cell (stopped by a bad photo, say) under other options:
    (tmp_path / "s" / "protocol.json").write_text(json.dumps({"num_prompts": 3}))  # nothing to mix, not refused
    results = sweep.main(args)  # two cells at once, each in its own processes (the in-process path: test_evaluate)
    assert json.loads((tmp_path / "s" / "protocol.json").read_text())["num_prompts"] == 7
    assert set(results) == {("split_circle", "reference", None), ("split_circle", "floor", None),
                            ("split_circle", "shapes/attndreambooth", 0), ("split_circle", "shapes/textual_inversion", 0)}
    report = json.loads((tmp_path / "s" / "comparison.json").read_text())
    assert set(report["methods"]) == {"base model, category word", "base model, best caption", "attndreambooth",
                                      "textual_inversion"}
    from worlds.shapes.world_report import describing_captions
    caption = json.loads((tmp_path / "s" / "floor_captions.json").read_text())["split_circle"]["caption"]
    assert caption in describing_captions("split_circle")  # the best of those tried, on scenes of its own
    floor = sorted((tmp_path / "s" / "split_circle" / "floor" / "samples").glob("*/prompt.json"))[0]
    assert caption in json.loads(floor.read_text())["prompt"]  # what the floor's images were made from
    cell = tmp_path / "s" / "split_circle" / "shapes_attndreambooth" / "seed_0"
    metrics = json.loads((cell / "eval" / "metrics.json").read_text())
    assert len(metrics["prompts"]) == 7 and metrics["prompts"][6]["prompt"].startswith("a ")
    from PIL import Image

    from worlds.shapes.read import alignment, identity
    from worlds.shapes.bench import parse_caption
    first = sorted(p for p in (cell / "samples").iterdir() if p.is_dir())[0]
    image, prompt = Image.open(first / "000.png"), json.loads((first / "prompt.json").read_text())["prompt"]
    scene = parse_caption(prompt, "<v>", "split_circle")
    assert metrics["prompts"][0]["text"] == alignment(image, scene)[0]  # recomputed from the image itself
    assert metrics["prompts"][0]["identity"] == pytest.approx(identity(image, "split_circle"))
    assert 0 <= metrics["overall"]["attention_share"] <= 1 and "attention_iou" in metrics["overall"]
    table = (tmp_path / "s" / "comparison.md").read_text()
    main, _, paired, note, _, concepts, _, machine, costs = table.strip().split("\n\n")
    from attndreambooth.machine import machine as this_machine
    assert machine == f"On {this_machine()}:"  # every cell ran here, and its timings.json says so
    assert note.startswith("Multiple comparisons: this table holds 8 intervals; 0 exclude 0") and "keep 0." in note
    timing = json.loads((cell / "timings.json").read_text())  # the cell's own record of its parts
    row = next(r for r in costs.splitlines() if r.startswith("| attndreambooth | 1 |")).split(" | ")
    assert row[2:5] == [f"{timing[k]:.0f} s" for k in ("train_attndreambooth", "infer", "evaluate")]
    assert row[5] == f"{sum(timing[k] for k in ('train_attndreambooth', 'infer', 'evaluate')):.0f} s |"
    published = sorted(p.name for p in (tmp_path / "docs").iterdir())  # --publish: the report alone
    assert published == sorted(["comparison.md", "comparison.json", "scatter.png", "grid.png", "protocol.json",
                                "floor_captions.json", "vae_ceiling.json", "sweep"])
    assert (tmp_path / "docs" / "comparison.md").read_text() == table
    record = tmp_path / "docs" / "sweep"  # and what it was computed from, as OUT lays it out, without weights
    assert not list(record.rglob("*.safetensors")) and sum(f.stat().st_size for f in record.rglob("*")) < 300_000
    texts = [f.read_text() for f in record.rglob("*.json")] + [str(Image.open(f).text) for f in record.rglob("*.png")]
    assert not any(str(sweep.ROOT) in t for t in texts) and any("<repository>/models/shapes_v1" in t for t in texts)

    def at(out, *more):
        return [a if a != str(tmp_path / "s") else str(out) for a in args[:args.index("--publish")]] + list(more)
    again = at(record, "--report_only", "--publish", str(tmp_path / "docs"))  # published where it was: kept as is
    assert sweep.main(again) == results and (record / "comparison.md").read_text() == table
    assert np.array_equal(np.asarray(Image.open(record / "grid.png")), np.asarray(Image.open(tmp_path / "s" / "grid.png")))
    shutil.copytree(record, tmp_path / "elsewhere")  # into another machine's OUT: the same command finds it done
    assert sweep.main(at(tmp_path / "elsewhere")) == results and not list((tmp_path / "elsewhere").rglob("run"))
    assert main.count("\n") == 5 and "± " in main  # header, rule, the base model's two rows and the two methods
    diff = next(r for r in paired.splitlines() if r.startswith("| textual_inversion | 1 |"))
    ours, ti = (metrics["overall"]["identity"],
                json.loads((cell.parent.parent / "shapes_textual_inversion" / "seed_0" / "eval" / "metrics.json")
                           .read_text())["overall"]["identity"])
    assert diff.split(" | ")[2] == f"{ours - ti:+.3f} ± n/a"  # the pair's difference, from the two cells
    single = {"p": 1.0, "holm": False, "excludes_0": False}  # one pair: both signs as extreme, no interval
    assert json.loads((tmp_path / "s" / "comparison.json").read_text())["tests"]["textual_inversion"]["identity"] == single
    assert concepts.splitlines()[2].startswith("| split_circle | ") and f"{ours:.3f} / " in concepts
    import torch
    from diffusers import AutoencoderKL  # the ceiling column: the photos through the base model's VAE, by hand
    vae, photos = AutoencoderKL.from_pretrained(sweep.ROOT / "models" / "shapes_v1", subfolder="vae"), []
    for path in sorted((sweep.ROOT / "data" / "shapes" / "split_circle").glob("*.png")):
        x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)
        with torch.no_grad():
            y = vae.decode(vae.encode(x[None]).latent_dist.mean).sample[0].clamp(-1, 1)
        photos.append(Image.fromarray(((y.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()))
    ceiling = json.loads((tmp_path / "s" / "vae_ceiling.json").read_text())["split_circle"]
    assert len(photos) == 5 and ceiling == pytest.approx(np.mean([identity(im, "split_circle") for im in photos]),
                                                         abs=1e-4)
    assert concepts.splitlines()[0].startswith("| concept | VAE round trip (identity) | base model, category word |")
    assert concepts.splitlines()[2].startswith(f"| split_circle | {ceiling:.3f} | ")
    assert (tmp_path / "s" / "scatter.png").is_file() and Image.open(tmp_path / "s" / "grid.png").size[0] > 300
    assert sweep.main(args) == results  # every cell done before: skipped, same numbers
    more = [*args, "--report_only"]
    more[more.index("--methods") + 1] += ",shapes/dreambooth"
    capsys.readouterr()
    assert sweep.main(more) == results and not (tmp_path / "s" / "split_circle" / "shapes_dreambooth").exists()
    assert "4 of 5 cells finished" in capsys.readouterr().out  # the missing cell is counted, not trained
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "s").rglob("*")}
    other = [*args]
    other[other.index("--num_prompts") + 1] = "5"  # measured otherwise: refused before anything is written
    with pytest.raises(SystemExit, match="--num_prompts 7 before, 5 now"):
        sweep.main(other)
    with pytest.raises(SystemExit, match="--num_prompts 7 before, 5 now"):
        sweep.main([*other, "--report_only"])
    assert before == {f: f.stat().st_mtime_ns for f in (tmp_path / "s").rglob("*")}
    from attndreambooth.trainer.run_folder import hold_folder
    running = hold_folder(tmp_path / "s", "--out", "a running sweep")  # as another sweep process would
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 's'} is in use by a running sweep \\(pid "):
        sweep.main(args)
    assert sweep.main(more) == results  # a report only reads: it may run beside a sweep
    running.close()
    sampler_agreement = script("sampler_agreement")  # the same cells sampled with other steps, beside theirs, compared
    sampler_agreement.main(["--out", str(tmp_path / "s"), "--cells", "2", "--steps", "3"])
    agreement = json.loads((tmp_path / "s" / "sampler_agreement.json").read_text())
    assert [(r["method"], r["seed"]) for r in agreement["cells"]] == [("floor", None), ("reference", None)]
    for row in agreement["cells"]:
        cell = tmp_path / "s" / "split_circle" / row["method"]
        assert row["after"] == json.loads((cell / "eval_3" / "metrics.json").read_text())["overall"]
        assert row["before"] == json.loads((cell / "eval" / "metrics.json").read_text())["overall"]
    assert agreement["summary"]["text"]["largest"] == max(abs(r["after"]["text"] - r["before"]["text"])
                                                          for r in agreement["cells"])
    assert sweep.main(more) == results  # the sweep's own samples and numbers untouched
    for name in ("sampler_agreement.md", "sampler_agreement.json"):  # published with the report once they exist
        assert (tmp_path / "docs" / name).read_bytes() == (tmp_path / "s" / name).read_bytes()


def test_readme_and_docs_tables_are_the_committed_report():
    """The shapes overview's and comparison page's tables are pasted from a committed report (what the one command
    wrote): docs/reports/shapes_results/ (the first run), docs/reports/shapes_results_r2/ (the rerun) and
    docs/reports/shapes_results_v3/ (the third run, on the third world's model).
    Reports share their headers, so a page says whose tables follow with a line `<!-- report: docs/DIR -->`;
    a table with one of a report's headers must repeat the rows of one of that report's tables under it exactly
    (a report has a cost table per machine, all under one header), and may not stand before any marker."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    reports = ("docs/reports/shapes_results", "docs/reports/shapes_results_r2", "docs/reports/shapes_results_v3")

    def tables(text):
        found, rows, report = {}, [], None
        for line in [*text.splitlines(), ""]:
            if marker := re.fullmatch(r"<!-- report: (\S+) -->", line.strip()):
                report = marker[1]
            if line.startswith("|"):
                rows.append(line.rstrip())
            elif rows:
                found.setdefault((report, rows[0]), []).append(rows[2:])
                rows = []
        return found

    committed = {}
    for name in reports:
        committed[name] = {header: bodies for (_, header), bodies in
                           tables((root / name / "comparison.md").read_text()).items()}
        assert len(committed[name]) >= 3, name
    headers = {h for r in committed.values() for h in r}
    for page in ("docs/reports/shapes_overview.md", "docs/reports/shapes_comparison.md"):
        copies = [(r, h, b) for (r, h), bodies in tables((root / page).read_text()).items() if h in headers
                  for b in bodies]
        for name in reports:  # the main table and the paired differences of each report at least
            assert sum(r == name for r, _, _ in copies) >= 2, f"{page}: {name}'s tables are not shown"
        for report, header, body in copies:
            assert report in committed, f"{page}: a table under {header[:40]!r} has no report marker before it"
            assert body in committed[report].get(header, []), \
                f"{page}: the table under {header[:40]!r} differs from {report}/comparison.md"


def test_the_published_multiple_comparison_figures_are_the_committed_cells():
    """The reports' account of the first world's multiple comparisons is what stats.py computes
    from docs/reports/shapes_results/comparison.json's cells."""
    import json

    from worlds.comparison import METRICS, pairs_of
    from worlds.stats import paired_tests
    report = json.loads((ROOT / "docs" / "reports" / "shapes_results" / "comparison.json").read_text())
    cells = {(c["concept"], c["method"], c["seed"]): c for c in report["cells"]}
    tests = paired_tests(pairs_of(cells), METRICS)
    kept = sorted(key for key, t in tests.items() if t["holm"])
    assert kept == [("base model, category word", "identity"), ("no_stage2", "attention_iou")]
    said = (f"The paired table holds {len(tests)} intervals. {sum(t['excludes_0'] for t in tests.values())} of them "
            f"exclude 0, where about {0.05 * len(tests):.1f} would by chance alone at 95 %.")
    for page in ("docs/reports/shapes_overview.md", "docs/reports/shapes_comparison.md"):
        assert said in (ROOT / page).read_text().replace("\n  ", " ").replace("\n", " "), page
    assert round(tests[("no_reg", "attention_share")]["p"], 3) == 0.006


def test_the_reruns_multiple_comparison_paragraph_is_what_its_cells_give():
    """The rerun's paragraph on multiple comparisons, quoted in the reports, is what stats.py computes
    from docs/reports/shapes_results_r2/comparison.json's cells, and what its comparison.md says."""
    import json
    import re

    from worlds.comparison import METRICS, pairs_of
    from worlds.stats import multiplicity_note, paired_tests
    report = json.loads((ROOT / "docs" / "reports" / "shapes_results_r2" / "comparison.json").read_text())
    cells = {(c["concept"], c["method"], c["seed"]): c for c in report["cells"]}
    tests = paired_tests(pairs_of(cells), METRICS)
    said = multiplicity_note(tests)
    text = (ROOT / "docs" / "reports" / "shapes_results_r2" / "comparison.md").read_text()
    intervals = len(re.findall(r"\| [+-]\d\.\d{3} ± ", text))  # the paired table's cells: signed differences
    assert said.startswith(f"Multiple comparisons: this table holds {intervals} intervals;"), said
    stars = len(re.findall(r"\| [+-]\d\.\d{3} ± \d\.\d{3} \*", text))  # the table marks what Holm keeps
    assert stars == sum(t["holm"] for t in tests.values())
    for page in ("docs/reports/shapes_results_r2/comparison.md", "docs/reports/shapes_overview.md", "docs/reports/shapes_comparison.md"):
        assert said in " ".join((ROOT / page).read_text().split()), page


def test_an_older_first_world_sweep_resumes_from_the_moved_model_and_not_the_new_one(tmp_path, monkeypatch, capsys):
    """A first-world sweep recorded base_model <repository>/models/shapes before the third world's model took
    that folder: it resumes from models/shapes_v1 (the same weights, the new default), and the third world's
    model under the old name is refused in one line."""
    import json

    from attndreambooth.sweep import checks
    sweep, recorded = script("sweep"), []

    def check(args):
        recorded.append(checks.check_protocol(args))
        return recorded[-1]
    monkeypatch.setattr(sweep, "check_protocol", check)
    out = tmp_path / "old"
    argv = ["--world", "shapes", "--concepts", "split_circle", "--out", str(out), "--dry_run"]
    sweep.main(argv)  # nothing recorded yet: this run's protocol, as the sweep would write it
    assert recorded[-1]["base_model"] == "<repository>/models/shapes_v1"
    out.mkdir()
    (out / "protocol.json").write_text(json.dumps({**recorded[-1], "base_model": "<repository>/models/shapes"}))
    metrics = out / "split_circle" / "reference" / "eval" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{}")  # a finished cell: the protocol now binds
    sweep.main(argv)
    with pytest.raises(SystemExit, match=r"^error: .*--base_model '<repository>/models/shapes_v1' before, "
                                         r"'<repository>/models/shapes' now"):
        sweep.main(argv + ["--base_model", str(ROOT / "models" / "shapes")])
