"""Bad input is named, with what to do, before any weights load; the user's files stay as they were."""
import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

import train_attndreambooth as T
from attndreambooth.config.loading import load_config
from attndreambooth.families import source as models
from attndreambooth.trainer.data import list_images, load_rgb
from conftest import ROOT, SAMPLE


LOAD_PIPELINE = models.load_pipeline


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input error")
    monkeypatch.setattr(models, "load_pipeline", refuse)


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(SAMPLE, folder)
    return folder


def snapshot(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def fail(data, tmp_path, *overrides):
    """Run the trainer; return its error message, checking nothing was touched or created."""
    before = snapshot(data)
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={data}",
                f"output_dir={tmp_path}/run", *overrides])
    assert snapshot(data) == before and not (tmp_path / "run").exists()
    return str(e.value.code)


def test_heic_and_truncated_files_are_named(data, tmp_path):
    (data / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    msg = fail(data, tmp_path)
    assert "IMG_0001.HEIC is not an image" in msg and "convert to JPEG" in msg
    (data / "IMG_0001.HEIC").unlink()
    jpeg = (data / "toy_0.jpg").read_bytes()
    (data / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    assert "cut.jpg cannot be read as an image" in fail(data, tmp_path)


def test_tiny_and_huge_images_refused(data, tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(data / "thumb.png")
    assert "thumb.png is 40x30 px, under data.min_image_size=128" in fail(data, tmp_path)
    (data / "thumb.png").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 128x128 = 16384 px is now a decompression bomb
    assert "too large to decode safely" in fail(data, tmp_path)


def test_modes_are_converted_and_reported(data, tmp_path):
    rgba = Image.new("RGBA", (130, 130), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 65, 130))
    rgba.save(data / "alpha.png")
    Image.new("CMYK", (130, 130), (0, 255, 255, 0)).save(data / "print.jpg")
    Image.new("L", (130, 130), 128).save(data / "gray.png")
    Image.new("P", (130, 130), 3).save(data / "palette.png")
    Image.fromarray(np.full((130, 130), 65535 // 2, dtype=np.uint16)).save(data / "deep.png")
    Image.new("RGB", (300, 200)).save(data / "small.jpg")  # under the 512 px a real run trains at
    shutil.copy(data / "toy_1.jpg", data / "toy_1 copy.jpg")
    notes = []
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.instance_dir={data}", "data.resolution=512"])
    paths = list_images(cfg.data, notes.append)
    assert len(paths) == 12
    text = "\n".join(notes)
    for name, what in [("alpha.png", "mode RGBA: alpha composited on white"), ("print.jpg", "mode CMYK: converted"),
                       ("gray.png", "mode L: converted"), ("palette.png", "mode P"), ("deep.png", "mode I;16"),
                       ("small.jpg", "smaller than data.resolution=512"), ("toy_1 copy.jpg", "duplicate of")]:
        assert any(name in n and what in n for n in notes), (name, text)
    flat = np.asarray(load_rgb(data / "alpha.png"))
    assert flat[0, 0].tolist() == [0, 0, 255] and flat[0, -1].tolist() == [255, 255, 255]  # on white
    assert np.asarray(load_rgb(data / "alpha.png", "#000000"))[0, -1].tolist() == [0, 0, 0]
    # 16-bit is scaled by the 16-bit range: mid-grey stays mid-grey (not stretched to white, not clipped)
    assert np.asarray(load_rgb(data / "deep.png"))[0, 0].tolist() == [127, 127, 127]
    assert np.asarray(load_rgb(data / "gray.png"))[0, 0].tolist() == [128, 128, 128]


def test_tokens_checked_with_the_tokenizer_alone(data, tmp_path, caplog):
    assert "'data.placeholder': 'toy' is already a word" in fail(data, tmp_path, "data.placeholder=toy")
    long = "a photo of " + "a very " * 40 + "{placeholder} {category}"
    assert "tokens, over the text encoder's 77; shorten it" in fail(data, tmp_path, f"data.prompt_template='{long}'")
    from attndreambooth.trainer.preflight import check_tokens
    with caplog.at_level("WARNING"):
        check_tokens(load_config(ROOT / "configs/tiny.yaml", [f"data.instance_dir={data}", "data.category=stuffed animal"]))
    assert "'stuffed animal' is 2 tokens" in caplog.text and "starts from the first, 'stuffed</w>'" in caplog.text


def test_output_folder_problems(data, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path}/afile"])
    assert "is a file" in str(e.value.code)
    import attndreambooth.trainer.preflight as P
    monkeypatch.setattr(P.os, "access", lambda *a: False)
    assert f"config key 'output_dir': {tmp_path} is not writable; give a folder you can write to" in fail(data, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    msg = fail(data, tmp_path)
    assert "the run needs about 100 MB" in msg and "has 0 MB free" in msg and "runtime.keep_checkpoints" in msg  # MB under 1 GB
    # resume=false moves an earlier run aside only once every other check has passed: not on a full disk
    run = tmp_path / "earlier"
    run.mkdir()
    (run / "config.yaml").write_text("output_dir: x\n")
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={data}", f"output_dir={run}",
                "resume=false"])
    assert "has 0 MB free" in str(e.value.code)
    assert (run / "config.yaml").exists() and not list(tmp_path.glob("earlier.previous-*"))


def test_validation_prompt_cut_off_by_77_tokens_is_refused(data, tmp_path):
    long = "a photo of a red toy " * 16 + "and {}"
    with pytest.raises(SystemExit) as e:
        T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={data}", f"output_dir={tmp_path}/r",
                "validation.every_steps=5", f"validation.prompts=['{long}']"])
    assert "config key 'validation.prompts'" in str(e.value.code) and "falls past" in str(e.value.code)
    assert not (tmp_path / "r").exists()


def test_no_test_switch_is_read_from_the_environment():
    """Faults are injected by tests through hooks; production code reads only these variables."""
    import re
    allowed = {"WORLD_SIZE", "RANK", "ATTNDB_CACHE",
               "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",  # these two are set, not read: torch's compile caches
               "CUDA_VISIBLE_DEVICES"}  # the user's choice of GPUs, which a sweep's cells keep (sweep/local.py)
    files = [*ROOT.glob("*.py"), *(ROOT / "attndreambooth").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    names = {m for f in files for m in re.findall(r"environ(?:\.get)?\(?\[?[\"']([A-Z_]+)", f.read_text())}
    assert names and names <= allowed, names - allowed


def rgb_profile(colorants, gamma=1.0):
    """A minimal ICC v2 RGB matrix/TRC display profile: `colorants` are the R, G, B columns (PCS XYZ, D50)."""
    import struct

    def s15(x):
        return struct.pack(">i", round(x * 65536))

    def xyz(v):
        return b"XYZ " + b"\0" * 4 + b"".join(s15(c) for c in v)

    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", 5) + b"test\0" + b"\0" * 4 + b"\0" * 4 + b"\0" * 2 + b"\0" + b"\0" * 67
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249)))]
    tags += [(name, xyz(c)) for name, c in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants)]
    tags += [(name, curve) for name in (b"rTRC", b"gTRC", b"bTRC")]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for name, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += name + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(">I4sI4s4s4s", size, b"\0" * 4, 0x02100000, b"mntr", b"RGB ", b"XYZ ") + b"\0" * 12
    header += b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def test_colour_profile_is_converted_to_srgb(tmp_path):
    """A photo tagged with a wide-gamut profile must not be read as if it were sRGB: here a profile whose
    red channel is sRGB's green primary (and green is red), so a "red" pixel is really green."""
    srgb_d50 = [(0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)]
    swapped = [srgb_d50[1], srgb_d50[0], srgb_d50[2]]
    Image.new("RGB", (200, 200), (255, 0, 0)).save(tmp_path / "tagged.png", icc_profile=rgb_profile(swapped))
    r, g, b = np.asarray(load_rgb(tmp_path / "tagged.png"))[0, 0].tolist()
    assert g > 200 and r < 60 and b < 60  # green, as the profile says; dropping the profile gives red


def test_a_named_pipe_among_the_photos_is_named_not_read(data, tmp_path):
    """A FIFO in data.instance_dir used to block the run (and --dry_run) for ever on its first read."""
    import os
    import threading
    os.mkfifo(data / "pipe.jpg")
    result = {}

    def dry_run():
        try:
            T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={data}",
                    f"output_dir={tmp_path}/run", "--dry_run"])
        except SystemExit as e:
            result["message"] = str(e.code)

    worker = threading.Thread(target=dry_run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the dry run hangs on the named pipe"
    assert "pipe.jpg is not a regular file (a named pipe, socket or device)" in result["message"]


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_loading(data, tmp_path, monkeypatch):
    """Under a launcher of 3 processes a batch of 4 cannot split: one line before weights load (it was an
    uncaught ValueError after loading); a run records how many processes trained it."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "'stages.stage1.batch_size': 4 does not split over the 3 processes launched" in fail(data, tmp_path)
    monkeypatch.setenv("RANK", "1")  # the other ranks find it too, and exit without saying it again
    assert fail(data, tmp_path) == "1"


def test_the_run_records_its_world_size(data, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_pipeline", LOAD_PIPELINE)  # this test loads the model
    out = T.main(["--config", str(ROOT / "configs/tiny.yaml"), f"data.instance_dir={data}", f"output_dir={tmp_path}/run",
                  "stages.stage1.steps=1", "stages.stage2.steps=1", "stages.stage3.steps=1", "data.views_per_image=1",
                  "runtime.tensorboard=false"])
    assert (out / "config.yaml").read_text().startswith("# trained by 1 process\n")
    assert "1 process train" in (out / "train.log").read_text()
