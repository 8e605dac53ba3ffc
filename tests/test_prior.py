"""DreamBooth's prior preservation (`prior`): the loss against separate instance and class passes, the class
images made once and the same whichever run makes them, a user's own class images used as they are, a killed
run resuming bit for bit, and each wrong key named before weights load."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_attndreambooth as T
from attention_reg import CrossAttentionCapture, attention_reg_loss
from attndreambooth.config.loading import load_config
from attndreambooth.families import Conditioning, by_name
from attndreambooth.trainer.prior import class_prompt
from attndreambooth.trainer.method import AttnDreamBoothLoss
from conftest import ROOT
from test_resume import final_tensors, metrics, train

SD = by_name("sd")
PRIOR = {"prior.enabled": "true", "prior.num_class_images": 3, "prior.steps": 2}


def test_the_loss_is_the_instance_and_class_passes_apart(tiny_pipe):
    """One U-Net call on instance + class images = the instance loss and Eq. 2 of a call on the instance
    images alone, plus weight x the class images' MSE of a call on them alone with the class prompt."""
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 900])
    c0, c_noise, c_t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])
    cond, class_cond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad(), CrossAttentionCapture(unet, [5, 6]) as cap:
        objective = AttnDreamBoothLoss(SD, unet, [tiny_pipe.text_encoder], sched, cap, "per_layer")
        terms = objective(x0, noise, t, cond=Conditioning(cond), mean_weight=2.0, var_weight=5.0,
                          prior=(c0, c_noise, c_t, None, Conditioning(class_cond)), prior_weight=0.5)
        cap.clear()
        alone = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, cond.expand(2, -1, -1)).sample, noise)
        reg = attention_reg_loss(cap.maps, 2.0, 5.0, "per_layer")
        prior = F.mse_loss(unet(sched.add_noise(c0, c_noise, c_t), c_t, class_cond.expand(2, -1, -1)).sample, c_noise)
    assert terms["mse"].item() == pytest.approx(alone.item(), rel=1e-5)
    assert terms["prior"].item() == pytest.approx(prior.item(), rel=1e-5) and prior.item() > 0
    assert terms["reg"].item() == pytest.approx(reg.item(), rel=1e-4) and reg.item() > 0
    assert terms["loss"].item() == pytest.approx(alone.item() + 0.5 * prior.item() + reg.item(), rel=1e-5)


def test_class_prompt_is_the_training_prompt_without_v():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["data.category=dog"], check=False)
    assert class_prompt(cfg) == "a photo of a dog"
    cfg = load_config(ROOT / "configs/tiny.yaml", ["data.category=dog", "prior.class_prompt=a {category} outdoors"],
                      check=False)
    assert class_prompt(cfg) == "a dog outdoors"


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior") / "run"
    done = train(out, **PRIOR)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done


@pytest.mark.slow
def test_class_images_are_made_once_alike_and_the_prior_term_is_logged(prior_run, tmp_path):
    out, done = prior_run
    made = sorted((out / "class_images").glob("*.png"))
    assert [p.name for p in made] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert "3 class images of 'a photo of a toy' in " in done.stdout + done.stderr
    assert "0 there, 3 to generate with the base model (6 denoiser steps with guidance" in done.stdout + done.stderr
    rows = metrics(out)
    assert all(r["prior"] == 0 for r in rows if r["stage"] == "stage1")  # an embedding stage: nothing to preserve
    assert all(r["prior"] > 0 for r in rows if r["stage"] != "stage1")
    for r in rows:  # the logged loss is its terms' sum, weight 1
        assert r["loss"] == pytest.approx(r["mse"] + r["reg"] + r["prior"], rel=1e-5)
    other = tmp_path / "other"  # another run generating into its own folder makes the same images
    again = train(other, **PRIOR, **{"stages.stage1.steps": 1, "stages.stage2.steps": 1, "stages.stage3.steps": 1})
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.read_bytes() for p in made] == [p.read_bytes() for p in sorted((other / "class_images").glob("*.png"))]


@pytest.mark.slow
def test_a_killed_run_with_the_prior_resumes_bit_for_bit(prior_run, tmp_path):
    out = tmp_path / "run"
    killed = train(out, ["--kill=stage3:3"], **PRIOR)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = train(out, **PRIOR)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "generating" not in resumed.stdout + resumed.stderr  # the class images were there
    want, got = final_tensors(prior_run[0]), final_tensors(out)
    assert [k for k in want if not (want[k] == got[k]).all()] == []
    assert metrics(out) == metrics(prior_run[0])


def test_a_users_own_class_images_are_used_and_none_generated(tmp_path):
    mine = tmp_path / "dogs"
    mine.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(mine / f"dog_{i}.jpg")
    out = tmp_path / "run"
    done = train(out, **PRIOR, **{"prior.class_dir": mine, "stages.stage1.steps": 1, "stages.stage2.steps": 1,
                                  "stages.stage3.steps": 1})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "generating" not in done.stdout + done.stderr and "3 class images" in done.stdout + done.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["dog_0.jpg", "dog_1.jpg", "dog_2.jpg"]


@pytest.mark.parametrize("override, key", [
    (["prior.weight=0"], "prior.weight"),
    (["prior.num_class_images=0"], "prior.num_class_images"),
    (["prior.num_class_images=100000000"], "prior.num_class_images"),
    (["prior.class_prompt=a {placeholder} dog"], "prior.class_prompt"),
    (["stages.stage2.enabled=false", "stages.stage3.enabled=false"], "prior.enabled"),
    (["prior.class_dir=README.md"], "prior.class_dir"),
])
def test_wrong_prior_keys_are_one_line_before_weights_load(tmp_path, capsys, override, key):
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}", "prior.enabled=true",
            f"data.instance_dir={ROOT / 'data/sample_toy'}", *[o.replace("README.md", str(ROOT / "README.md"))
                                                                for o in override]]
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    assert str(e.value).startswith(f"error: config key '{key}'") and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_dry_run_says_how_many_class_images_will_be_made_and_their_cost(tmp_path, capsys):
    """Counts that create work are stated before the work: the images there, those to generate, the
    denoiser steps and the estimated disk (PNG at about half the raw size)."""
    from PIL import Image
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), "red").save(folder / f"dog_{i}.png")
    T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}", "prior.enabled=true",
            f"prior.class_dir={folder}", "prior.num_class_images=10", "prior.steps=25", "--dry_run"])
    out = capsys.readouterr().out
    mb = 7 * 64 * 64 * 3 * 0.5 / 1e6
    assert (f"prior preservation: 10 class images of 'a photo of a toy' in {folder}: 3 there, 7 to generate with "
            f"the base model (175 denoiser steps with guidance, ~{mb:,.0f} MB of PNG, estimated)") in out
    assert not (tmp_path / "run").exists()


def test_a_damaged_class_image_is_refused_before_weights_load(tmp_path, monkeypatch):
    """A truncated PNG in prior.class_dir surfaced as a traceback after the weights loaded, its advice naming
    the instance folder's switch; now the class folder is checked with the photos, in preflight."""
    import attndreambooth.families.source as source
    monkeypatch.setattr(source, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    folder = tmp_path / "class"
    folder.mkdir()
    photo = (ROOT / "data/sample_toy/toy_1.jpg").read_bytes()
    (folder / "class_00000.jpg").write_bytes(photo)
    (folder / "class_00001.jpg").write_bytes(photo[:len(photo) // 2])
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}", "prior.enabled=true",
                f"prior.class_dir={folder}"])
    message = str(e.value)
    assert message.startswith("error: prior.class_dir: 1 file(s) cannot be used:")
    assert f"{folder / 'class_00001.jpg'} cannot be read as an image" in message
    assert "skip_invalid_files" not in message and not (tmp_path / "run").exists()
