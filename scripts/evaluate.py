"""CLIP-I, CLIP-T and DINO of generated images (the Textual Inversion / DreamBooth protocol), or the shapes
world's exact metrics.

    python scripts/evaluate.py --samples runs/my_dog/samples --real path/to/my_dog --out runs/my_dog/eval
    python scripts/evaluate.py --samples runs/star/samples --world shapes --concept checker_star

`--samples` is a folder with one folder per prompt, as infer.py writes them (images + prompt.json).
- CLIP-I: mean cosine similarity of CLIP image embeddings, each generated image against each real one;
- CLIP-T: cosine similarity of the image and its prompt with the placeholder removed ("a <v> dog" -> "a dog");
- DINO: as CLIP-I with the [CLS] embedding of DINO ViT-S/16.
Per prompt the mean over its images; overall the mean over prompts. Models by hub id or local
folder (`--clip openai/clip-vit-large-patch14` for ViT-L/14); "tiny" builds random tiny ones (tests).
Writes metrics.json, metrics.md and scatter.png (identity vs text alignment).
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # worlds/ and bench/ live beside the package

import torch
import torch.nn.functional as F

from attndreambooth.cli import Parser
from attndreambooth.sweep.scatter import scatter
from attndreambooth.families.source import cached_build, quiet_known_noise
from attndreambooth.trainer.data import IMAGE_SUFFIXES, image_problem, load_rgb
from worlds import WORLDS

CLIP_DEFAULT, DINO_DEFAULT = "openai/clip-vit-base-patch32", "facebook/dino-vits16"


def build_tiny_evaluators(folder):
    """Random tiny CLIP and DINO (ViT) saved as model folders: for tests and CPU demos, not for numbers."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from attndreambooth.families.tokenizer import write_tiny_tokenizer
    folder = Path(folder)
    torch.manual_seed(0)
    write_tiny_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok")
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2),
                                vision_config=vision, projection_dim=16))
    clip.save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=tokenizer).save_pretrained(folder / "clip")
    ViTModel(ViTConfig(**vision), add_pooling_layer=False).save_pretrained(folder / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")
    return folder / "clip", folder / "dino"


class Encoders:
    """Unit-norm CLIP image/text and DINO [CLS] embeddings."""

    def __init__(self, clip=CLIP_DEFAULT, dino=DINO_DEFAULT, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor
        if "tiny" in (clip, dino):
            tiny = cached_build("tiny-eval-v1", build_tiny_evaluators)
            clip = tiny / "clip" if clip == "tiny" else clip
            dino = tiny / "dino" if dino == "tiny" else dino
        self.device = device
        self.clip, self.clip_proc = CLIPModel.from_pretrained(clip).to(device).eval(), CLIPProcessor.from_pretrained(clip)
        self.dino, self.dino_proc = AutoModel.from_pretrained(dino).to(device).eval(), AutoImageProcessor.from_pretrained(dino)

    @torch.no_grad()
    def clip_images(self, images):
        pixels = self.clip_proc(images=images, return_tensors="pt").pixel_values.to(self.device)
        return F.normalize(_tensor(self.clip.get_image_features(pixel_values=pixels)), dim=-1)

    @torch.no_grad()
    def clip_texts(self, texts):
        batch = self.clip_proc(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(_tensor(self.clip.get_text_features(**batch)), dim=-1)

    @torch.no_grad()
    def dino_images(self, images):
        pixels = self.dino_proc(images=images, return_tensors="pt").pixel_values.to(self.device)
        return F.normalize(self.dino(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)  # [CLS]


def _tensor(features):
    """transformers 5 may return an output object where 4.x returned the tensor."""
    return features if torch.is_tensor(features) else features.pooler_output


def image_paths(folder, flag):
    """The images of a folder, each checked whole (attndreambooth.trainer.data.image_problem): a special file,
    an unreadable or truncated image, or a folder without images is one line naming it. Other files (notes,
    prompt.json, the grid) are left out."""
    paths = [p for p in sorted(Path(folder).iterdir()) if not p.name.startswith(".") and p.stem != "grid"
             and not p.is_dir() and (p.suffix.lower() in IMAGE_SUFFIXES or not p.is_file())]
    bad = [f"{p} {problem}" for p in paths if (problem := image_problem(p))]
    if bad:
        raise ValueError(f"{flag}: {'; '.join(bad)}; remove or replace {'it' if len(bad) == 1 else 'them'}")
    if not paths:
        raise ValueError(f"{flag}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_images(folder, flag):
    return [load_rgb(p) for p in image_paths(folder, flag)]


def text_prompt(record, placeholder="<v>"):
    """The prompt as CLIP-T reads it: without the placeholder ("a <v> dog" -> "a dog")."""
    token = record.get("placeholder", placeholder)
    return " ".join(w for w in record["prompt"].split() if w != token)


def evaluate(samples, real, encoders, placeholder="<v>"):
    """Per-prompt and overall CLIP-I, CLIP-T and DINO of a samples folder against real photos."""
    real_images = read_images(real, "--real")
    real_clip, real_dino = encoders.clip_images(real_images), encoders.dino_images(real_images)
    prompts = []
    for folder in sorted(p for p in Path(samples).iterdir() if (p / "prompt.json").is_file()):
        record = json.loads((folder / "prompt.json").read_text())
        images = read_images(folder, "--samples")
        clip, dino = encoders.clip_images(images), encoders.dino_images(images)
        text = text_prompt(record, placeholder)
        prompts.append(dict(prompt=record["prompt"], text=text, images=len(images),
                            clip_i=(clip @ real_clip.T).mean().item(), dino=(dino @ real_dino.T).mean().item(),
                            clip_t=(clip @ encoders.clip_texts([text]).T).mean().item()))
    if not prompts:
        raise ValueError(f"--samples: {samples} holds no prompt folders (with prompt.json), as infer.py writes them")
    overall = {k: statistics.mean(p[k] for p in prompts) for k in ("clip_i", "clip_t", "dino")}
    return dict(overall=overall, prompts=prompts, real_images=len(real_images))


WORLD_COLUMNS = {"identity": "identity", "text": "text alignment", "attention_share": "[V] attention share",
                 "attention_iou": "attention IoU"}


def markdown(result):
    if result.get("world"):  # the shapes world: exact metrics (worlds.shapes)
        keys = list(result["overall"])
        lines = ["| prompt | images | " + " | ".join(WORLD_COLUMNS[k] for k in keys) + " |",
                 "|---|---|" + "---|" * len(keys)]
        for p in result["prompts"]:
            lines.append(f"| {p['prompt']} | {p['images']} | "
                         + " | ".join(f"{p[k]:.3f}" if k in p else "" for k in keys) + " |")
        lines.append("| **overall (mean over prompts)** | | "
                     + " | ".join(f"**{result['overall'][k]:.3f}**" for k in keys) + " |")
        return "\n".join(lines)
    lines = ["| prompt (as CLIP-T reads it) | images | CLIP-I | CLIP-T | DINO |", "|---|---|---|---|---|"]
    for p in result["prompts"]:
        lines.append(f"| {p['text']} | {p['images']} | {p['clip_i']:.3f} | {p['clip_t']:.3f} | {p['dino']:.3f} |")
    o = result["overall"]
    lines.append(f"| **overall (mean over prompts)** | | **{o['clip_i']:.3f}** | **{o['clip_t']:.3f}** | **{o['dino']:.3f}** |")
    return "\n".join(lines)


def check_args(args, out):
    """Folders, models and the concept, each named when wrong, before any model loads."""
    from attndreambooth.config.checks import folder_problem, looks_like_hub_id
    samples = Path(args.samples)
    if not samples.is_dir():
        raise ValueError(f"--samples {samples} " + ("is a file" if samples.exists() else "does not exist")
                         + "; give infer.py's output folder (one folder per prompt)")
    if not any((p / "prompt.json").is_file() for p in samples.iterdir()):
        raise ValueError(f"--samples: {samples} holds no prompt folders (with prompt.json), as infer.py writes them")
    models = {}
    for record_file in sorted(samples.glob("*/prompt.json")):
        try:
            record = json.loads(record_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"--samples: {record_file} is not readable JSON; rerun infer.py for that prompt") from None
        made_by = {k: record.get(k) for k in ("run", "stage", "base", "embeds", "unet_weights")}
        models.setdefault(json.dumps(made_by, sort_keys=True), record_file.parent.name)
    if len(models) > 1:  # e.g. stage-1 samples beside the final model's: scored together they mean nothing
        raise ValueError(f"--samples: {samples} holds samples of {len(models)} different models or stages (e.g. "
                         f"{' and '.join(list(models.values())[:2])}, see their prompt.json); give infer.py a "
                         "separate --out for each and evaluate each folder")
    for folder in sorted(f.parent for f in samples.glob("*/prompt.json")):
        image_paths(folder, "--samples")
    if args.world:
        from worlds import load
        world = load(args.world)
        if args.concept is not None and args.concept not in world.CONCEPTS:
            raise ValueError(f"--concept {args.concept!r} is not one of {sorted(world.CONCEPTS)}")
        for record_file in sorted(samples.glob("*/prompt.json")):
            record = json.loads(record_file.read_text())
            try:
                world.parse_caption(record.get("prompt", ""), record.get("placeholder", args.placeholder), args.concept)
            except ValueError as e:
                raise ValueError(f"--samples: {record_file}: {e} (sizes, colours, patterns, shapes, positions and "
                                 "backgrounds of docs/reports/shapes_world.md); score other prompts without --world") from None
    else:
        if args.real is None:
            raise ValueError("--real is required (the concept's photos), unless --world is given")
        if not Path(args.real).is_dir():
            raise ValueError(f"--real {args.real} " + ("is a file" if Path(args.real).exists() else "does not exist")
                             + "; give the folder of the concept's photos")
        image_paths(args.real, "--real")
        for flag, name in (("--clip", args.clip), ("--dino", args.dino)):
            if name != "tiny" and not Path(name).is_dir() and not looks_like_hub_id(name):
                raise ValueError(f"{flag} {name!r} is neither a model folder nor a hub id (owner/name)")
    if problem := folder_problem(out):
        raise ValueError(f"--out: {problem}")


def main(argv=None):
    quiet_known_noise()
    p = Parser(description=__doc__)
    p.add_argument("--samples", required=True, help="infer.py's output folder (one folder per prompt)")
    p.add_argument("--real", help="the concept's real photos (not with --world)")
    p.add_argument("--world", choices=WORLDS, help="score with a world's exact metrics instead of CLIP/DINO (shapes: "
                   "the first shapes world; shapes3: the third)")
    p.add_argument("--concept", help="with --world: the concept [V] stands for (e.g. checker_star)")
    p.add_argument("--clip", default=CLIP_DEFAULT, help="CLIP model id or folder (ViT-B/32: the TI protocol)")
    p.add_argument("--dino", default=DINO_DEFAULT, help="DINO model id or folder")
    p.add_argument("--placeholder", default="<v>", help="used when prompt.json does not name it")
    p.add_argument("--name", default="run", help="label of this run in the scatter plot")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="output folder (default: SAMPLES/../eval)")
    args = p.parse_args(argv)
    out = Path(args.out or Path(args.samples).parent / "eval")
    try:
        check_args(args, out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.world:
        from worlds import load
        from worlds.scoring import score_samples
        result = score_samples(load(args.world), args.samples, args.concept, args.placeholder)
        point, labels = (result["overall"]["text"], result["overall"].get("identity", 0.0)), ("text alignment", "identity")
    else:
        result = evaluate(args.samples, args.real, Encoders(args.clip, args.dino, args.device), args.placeholder)
        result.update(clip_model=str(args.clip), dino_model=str(args.dino))
        point, labels = (result["overall"]["clip_t"], result["overall"]["dino"]), ("text alignment (CLIP-T)",
                                                                                 "identity (DINO)")
    result.update(name=args.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    (out / "metrics.md").write_text(markdown(result) + "\n")
    scatter([(args.name, *point)], out / "scatter.png", x_label=labels[0], y_label=labels[1])
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
