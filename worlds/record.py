"""A world comparison's record, for a repository beside its report: the sweep's OUT without weights, logs
or most images, laid out as OUT is. It holds what the report is computed from (each cell's eval/metrics.json
and timings.json, the protocol, the prompts, the floor captions and VAE ceilings) and what grid.png draws
(the first seed's first images of the first prompts, the first prompt's [V] map), so that
`scripts/sweep.py --world W --out RECORD --report_only` recomputes the report, and an OUT holding a copy of it
lets the same sweep command finish the remaining cells on another machine."""
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from worlds.comparison import first_image_path, grid_prompt_folders

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("protocol.json", "floor_captions.json", "vae_ceiling.json")  # OUT's own files the report reads


def write_record(out, cell_folders, samples, dest):
    """Copy into `dest` what the report needs of OUT: `cell_folders`, the finished cells' folders, and
    `samples`, the grid's samples folders ({(concept, method): folder})."""
    out, dest = Path(out), Path(dest)
    if dest.resolve() == out.resolve():  # a report recomputed from its record, published where it was: as it is
        return

    def keep(path, data=None):
        path = Path(path)
        target = dest / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:  # the first image's maps of the caption's positions alone (the panel's): ~1/25 of the file
            np.savez_compressed(target, **data)
        elif path.suffix == ".json":
            target.write_text(anonymous(path.read_text()))
        elif path.suffix == ".png":  # the same pixels; its parameters (infer.py's) without this checkout's path
            with Image.open(path) as image:
                info = PngInfo()
                for key, value in image.text.items():
                    info.add_text(key, anonymous(value))
                image.save(target, pnginfo=info)
        else:
            shutil.copyfile(path, target)

    for name in SHARED:
        if (out / name).is_file():
            keep(out / name)
    for prompts in sorted((out / "prompts").glob("*.txt")):
        keep(prompts)
    for cell in cell_folders:
        for name in ("eval/metrics.json", "timings.json"):
            if (Path(cell) / name).is_file():
                keep(Path(cell) / name)
    for folder in filter(Path.is_dir, map(Path, samples.values())):
        for k, prompt in enumerate(grid_prompt_folders(folder)):
            keep(prompt / "prompt.json")
            if image := first_image_path(prompt):
                keep(image)
            if k == 0 and (prompt / "attention_maps.npz").is_file():
                with np.load(prompt / "attention_maps.npz") as data:
                    found = {n: data[n] for n in data}
                end = int(found["positions"].max()) + 2 if len(found["positions"]) else 1  # start .. end of text
                keep(prompt / "attention_maps.npz", dict(found, maps=found["maps"][:1, :end]))


def anonymous(text):
    """A record names the checkout as protocol.json does, "<repository>": it is read on other machines."""
    return text.replace(str(ROOT), "<repository>")
