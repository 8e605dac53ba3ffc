"""The paper's comparison in a world (worlds.load): the methods and their configs, the held-out prompts of each
concept, the statistics (mean and 95 % confidence interval over concepts x seeds) and the report: the
table, the identity-vs-text scatter with its intervals, and a grid of samples with [V]'s attention.
scripts/sweep.py --world NAME runs it."""
import json
import os
import random
import statistics
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from worlds.stats import mean_ci, multiplicity_note, paired_tests

METHODS = ("attndreambooth", "textual_inversion", "dreambooth", "dreambooth_prior", "ti_db", "no_stage1", "no_stage2",
           "no_stage3", "no_reg", "pooled")  # configs/shapes/<name>.yaml
QUICK_METHODS = ("attndreambooth", "textual_inversion", "dreambooth", "ti_db")
REFERENCE = "base model, category word"  # the base model with "a big star ..." for "a big [V] star ..."
FLOOR = "base model, best caption"  # ... with the best description a user could write ("a big orange and teal
#                                     checkered star ..."), chosen on other scenes (OUT/floor_captions.json)
BASELINES = {"reference": REFERENCE, "floor": FLOOR}  # the base model's cells: no training, no seed
METRICS = {"identity": "identity", "text": "text alignment", "attention_share": "[V] attention share",
           "attention_iou": "[V] attention IoU"}
# the prompts' first six: one attribute each (what is left out of the full caption), then full captions
SINGLES = (("size", "position"), ("size", "position"), ("size", "background"), ("size", "background"),
           ("position", "background"), ("size", "position", "background"))


def bench_prompts(world, concept, n=20, seed=0):
    """`n` held-out prompt templates for the `world`'s `concept`, `{}` standing for "[V] category": the
    background, the position, the size and a second object alone, then full captions that combine them."""
    rng, category, out = random.Random(f"bench-{concept}-{seed}"), world.CONCEPTS[concept][0], []
    while len(out) < n:
        k = len(out)
        omit = SINGLES[k] if k < len(SINGLES) else ()
        want_second = k == len(SINGLES) - 1 or (k >= len(SINGLES) and rng.random() < 0.4)
        scene = world.random_scene(rng, second_prob=1.0 if want_second else 0.0, concept=concept)
        text = scene.caption(placeholder="{}", omit=omit).replace("{} " + category, "{}")
        if text not in out:
            out.append(text)
    return out


def world_cells(world, concepts, methods, seeds):
    """The grid, seed by seed (an interrupted sweep leaves whole seeds): (concept, its photos' folder,
    category, method, seed) cells, each concept's base-model cells first (methods "reference" and "floor",
    no seed)."""
    cell = lambda c, m, seed: (c, world.DATA / c, world.CONCEPTS[c][0], m, seed)  # noqa: E731
    return ([cell(c, m, None) for c in concepts for m in BASELINES]
            + [cell(c, m, seed) for seed in seeds for c in concepts for m in methods])


def per_concept_file(path, concepts, measure, valid):
    """{concept: entry} kept in the JSON file `path`, a sweep's derived data: entries already there are kept
    (a resumed sweep), those missing are `measure(todo)`d ({concept: entry}) and written at once (a report
    beside a sweep never reads a half-written file); a damaged file, or an entry `valid` refuses, is measured
    again."""
    path = Path(path)
    try:
        have = json.loads(path.read_text()) if path.is_file() else {}
        have = {c: e for c, e in have.items() if valid(e)}
    except (ValueError, AttributeError):  # cut short, or not a mapping
        have = {}
    todo = [c for c in concepts if c not in have]
    if todo:
        have.update(measure(todo))
        part = path.with_name(f".{path.name}.{os.getpid()}")
        part.write_text(json.dumps(have, indent=1) + "\n")
        os.replace(part, path)
    return {c: have[c] for c in concepts}


def _base_pipe(base_model, device):
    from attndreambooth.inference.loading import load_pipe
    pipe = load_pipe(None, None, base_model, None, [], "x", "fp32", device, "dpm++")[0]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_floor_captions(world, out, concepts, base_model, steps, device="cpu"):
    """OUT/floor_captions.json: per concept the base model's best descriptive caption and the identities of
    each tried (the world's caption_floor: scenes of its own, not the benchmark's prompts, sampled with the
    sweep's `steps`); returns {concept: caption}."""
    found = per_concept_file(Path(out) / "floor_captions.json", concepts,
                             lambda todo: world.caption_floor(_base_pipe(base_model, device), todo, steps=steps),
                             lambda e: isinstance(e, dict) and isinstance(e.get("caption"), str))
    return {c: e["caption"] for c, e in found.items()}


def write_vae_ceiling(world, out, photos, base_model, device="cpu"):
    """OUT/vae_ceiling.json: per concept (`photos`: {concept: its photos' folder}) the mean identity of its
    training photos after the base model's VAE round trip (encode, decode): what a method that reproduced the
    photos exactly would score through that VAE, so the most identity any method can show; returns
    {concept: identity}."""
    def measure(todo):
        from worlds.shapes.world_report import round_trip
        from attndreambooth.trainer.data import IMAGE_SUFFIXES, load_rgb
        vae, found = _base_pipe(base_model, device).vae, {}
        for c in todo:  # the photos as the trainer reads them (white behind any transparency)
            images = [load_rgb(f) for f in sorted(Path(photos[c]).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            found[c] = float(np.mean([world.identity(im, c) for im in round_trip(vae, images)]))
        return found
    return per_concept_file(Path(out) / "vae_ceiling.json", list(photos), measure,
                            lambda e: isinstance(e, (int, float)) and not isinstance(e, bool))


def write_prompts(world, out, concepts, n):
    """OUT/prompts/<concept>.txt: the held-out prompts each concept's cells sample."""
    (Path(out) / "prompts").mkdir(parents=True, exist_ok=True)
    for c in concepts:
        (Path(out) / "prompts" / f"{c}.txt").write_text("\n".join(bench_prompts(world, c, n)) + "\n")


def summarise(cells):
    """{method: {metric: (mean, ci), "n": cells}} from {(concept, method, seed): overall metrics}."""
    by_method = {}
    for (_, method, _), overall in cells.items():
        by_method.setdefault(method, []).append(overall)
    return {m: dict(n=len(rows), **{k: mean_ci([r[k] for r in rows]) for k in METRICS if all(k in r for r in rows)})
            for m, rows in by_method.items()}


def table(summary, head=("method", "cells"), sign="", marked=()):
    """Markdown: one row per method, mean ± 95 % half-width per metric (`sign`="+" for differences); the
    (method, metric) cells in `marked` get a star."""
    lines = [f"| {head[0]} | {head[1]} | " + " | ".join(METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    for method, row in summary.items():
        ci = lambda k: f"{row[k][1]:.3f}" if row["n"] > 1 else "n/a"  # noqa: E731  (one cell: no interval)
        star = lambda k: " *" if (method, k) in marked else ""  # noqa: E731
        cells = [f"{row[k][0]:{sign}.3f} ± {ci(k)}{star(k)}" if k in row else "n/a" for k in METRICS]
        lines.append(f"| {method} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(cells, against="attndreambooth"):
    """{method: {metric: (mean, ci), "n": pairs}}: `against` minus each other method over the (concept, seed)
    cells both have (the reference, trained on nothing, pairs by concept with every seed). The concept's
    difficulty, most of the spread between cells, cancels within a pair, so these intervals are the ones
    that say whether two methods differ."""
    return {m: dict(n=len(ps), **{k: mean_ci([a[k] - o[k] for a, o in ps]) for k in METRICS
                                  if all(k in a and k in o for a, o in ps)})
            for m, ps in pairs_of(cells, against).items()}


def pairs_of(cells, against="attndreambooth"):
    """{method: [(against's overall metrics, the method's)]} over the (concept, seed) cells both have; a grid
    without `against` has none (and the report no paired table)."""
    mine = {(c, s): o for (c, m, s), o in cells.items() if m == against}
    pairs = {}
    for (c, m, s), o in cells.items():
        if m != against:
            pairs.setdefault(m, []).extend((a, o) for (c2, s2), a in mine.items() if c2 == c and s in (None, s2))
    return {m: ps for m, ps in pairs.items() if ps}


def per_concept(cells, ceiling=None):
    """Markdown: per concept and method, identity / text alignment, each the mean over the seeds; with
    `ceiling` ({concept: identity}, write_vae_ceiling) a first column of what the VAE lets identity reach."""
    seeds = {}
    for (c, m, _), o in cells.items():
        seeds.setdefault((c, m), []).append(o)
    methods = list(dict.fromkeys(m for _, m in seeds))
    mean = lambda os_, k: statistics.mean(o[k] for o in os_)  # noqa: E731
    first = ["VAE round trip (identity)"] if ceiling else []
    lines = ["| concept | " + " | ".join(first + methods) + " |", "|---|" + "---|" * len(first + methods)]
    for c in dict.fromkeys(c for c, _ in seeds):
        row = [f"{mean(seeds[c, m], 'identity'):.3f} / {mean(seeds[c, m], 'text'):.3f}" if (c, m) in seeds else ""
               for m in methods]
        bound = [f"{ceiling[c]:.3f}" if c in ceiling else ""] if ceiling else []
        lines.append(f"| {c} | " + " | ".join(bound + row) + " |")
    return "\n".join(lines)


UNRECORDED = "a machine not recorded (cells timed before timings.json named it)"  # the cost tables' heading
PARTS = {"train_attndreambooth": "training", "infer": "sampling", "evaluate": "scoring"}  # a cell's timings.json


def cost(timings):
    """{machine: {method: {"cells": n, part: median seconds, ..., "total": median seconds}}} from {(concept,
    method, seed): a cell's timings.json}, by the machine each cell ran on (its timings.json says;
    UNRECORDED before they did): one cell took twice as long on one kind of CPU as on another. Medians, since
    a cell paused or slowed by other work on the machine times that too; a cell whose training resumed after
    a stop timed only what its last attempt redid, so it is left out (`resumed`; a method with only such
    cells has no row)."""
    by_machine = {}
    for (_, method, _), t in timings.items():
        if not t.get("resumed"):
            by_machine.setdefault(t.get("machine", UNRECORDED), {}).setdefault(method, []).append(t)
    return {machine: {m: dict(cells=len(rows), **{part: statistics.median(r.get(part, 0.0) for r in rows)
                                                  for part in PARTS},
                             total=statistics.median(sum(r.get(part, 0.0) for part in PARTS) for r in rows))
                      for m, rows in methods.items()}
            for machine, methods in sorted(by_machine.items())}


def cost_table(costs):
    """One table per machine, each headed by the machine."""
    blocks = []
    for machine, rows in costs.items():
        lines = [f"On {machine}:", "", "| method | cells | " + " | ".join(PARTS.values()) + " | cell |",
                 "|---|---|" + "---|" * (len(PARTS) + 1)]
        lines += [f"| {m} | {c['cells']} | " + " | ".join(f"{c[part]:.0f} s" for part in PARTS)
                  + f" | {c['total']:.0f} s |" for m, c in rows.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def scatter_points(summary):
    """(label, text, identity, their half-widths) per method, for attndreambooth.sweep.scatter."""
    out = []
    for method, row in summary.items():
        (x, dx), (y, dy) = row["text"], row.get("identity", (0.0, 0.0))
        out.append((method, x, y, dx, dy))
    return out


def first_image_path(folder):
    """A prompt folder's first image (infer.py's 000.png, ...), None if it has none."""
    return next(iter(sorted(Path(folder).glob("[0-9][0-9][0-9].png"))), None)


def _first_image(folder):
    path = first_image_path(folder)
    return Image.open(path).convert("RGB") if path else Image.new("RGB", (64, 64), "white")


def grid_prompt_folders(samples, prompts=None):
    """The prompt folders of a samples folder that grid.png draws: the first `prompts` (GRID_PROMPTS) by name."""
    return sorted(p for p in Path(samples).iterdir() if (p / "prompt.json").is_file())[:prompts or GRID_PROMPTS]


def _attention_panel(folder, placeholder, image, side):
    """[V]'s cross-attention map of the folder's first image, over the image (red = more)."""
    data = np.load(Path(folder) / "attention_maps.npz")
    tokens = [str(t) for t in data["tokens"]]
    m = data["maps"][0, 1 + tokens.index(placeholder)]
    heat = Image.fromarray(np.uint8(255 * (m - m.min()) / max(m.max() - m.min(), 1e-8))).resize((side, side))
    red = Image.merge("RGB", (heat, Image.new("L", (side, side)), Image.new("L", (side, side))))
    return Image.blend(image.resize((side, side), Image.NEAREST), red, 0.6)


GRID_PROMPTS = 3  # the samples per concept in grid.png (the first prompts' first images, seed 0)


def grid(samples, path, prompts=GRID_PROMPTS, side=96):
    """Rows: methods; per concept `prompts` samples (seed 0, first image of the first prompts) and [V]'s
    attention for the first prompt. `samples`: {(concept, method): samples folder}."""
    concepts = list(dict.fromkeys(c for c, _ in samples))
    methods = list(dict.fromkeys(m for _, m in samples))
    label_w, head_h, cols = 150, 16, prompts + 1
    sheet = Image.new("RGB", (label_w + len(concepts) * cols * side, head_h + len(methods) * side), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for j, concept in enumerate(concepts):
        draw.text((label_w + j * cols * side + 4, 2), f"{concept}: samples | [V] attention", fill="black", font=font)
    for i, method in enumerate(methods):
        y = head_h + i * side
        draw.text((4, y + side // 2 - 6), method, fill="black", font=font)
        for j, concept in enumerate(concepts):
            folder = samples.get((concept, method))
            if folder is None:
                continue
            prompt_folders = grid_prompt_folders(folder, prompts)
            for k, pf in enumerate(prompt_folders):
                sheet.paste(_first_image(pf).resize((side, side), Image.NEAREST),
                            (label_w + (j * cols + k) * side, y))
            first = prompt_folders[0] if prompt_folders else None
            if first is not None and (first / "attention_maps.npz").is_file():
                record = json.loads((first / "prompt.json").read_text())
                if record.get("placeholder"):
                    sheet.paste(_attention_panel(first, record["placeholder"], _first_image(first), side),
                                (label_w + (j * cols + prompts) * side, y))
    sheet.save(path)


def write_report(cells, out, samples, timings=None, ceiling=None):
    """comparison.md/.json (the table, AttnDreamBooth's paired differences, per-concept means, with `ceiling`
    the VAE's own identity per concept, and with `timings` what a cell cost by part), scatter.png and grid.png
    in `out`, from {(concept, method, seed): overall metrics} and {(concept, method): samples folder}; returns
    the table."""
    from attndreambooth.sweep.scatter import scatter
    out = Path(out)
    summary, paired = summarise(cells), paired_differences(cells)
    text = table(summary)
    parts, tests = [text], {}
    if paired:
        tests = paired_tests(pairs_of(cells), METRICS)
        survivors = {key for key, t in tests.items() if t["holm"]}
        parts += ["AttnDreamBooth minus each method, paired by concept and seed (mean ± 95 % interval of the "
                  "differences; > 0: AttnDreamBooth higher; * survives a Holm correction):",
                  table(paired, ("attndreambooth minus", "pairs"), "+", survivors), multiplicity_note(tests)]
    parts += ["Per concept, identity / text alignment (mean over seeds)" + (
        "; first, the identity of the concept's own photos after the base model's VAE (encode, decode), the most "
        "a method can show:" if ceiling else ":"), per_concept(cells, ceiling)]
    costs = cost(timings) if timings else {}
    if costs:
        parts += ["What a cell cost, median seconds by part, by the machine it ran on (each cell's timings.json, "
                  "those resumed after a stop left out; the processes that ran them shared the machine's cores; "
                  "wall-clock time, so a cell that ran while the sweep was paused or the machine busy with other "
                  "work counts that too, which the median keeps out of a row of several cells):",
                  cost_table(costs)]
    (out / "comparison.md").write_text("\n\n".join(parts) + "\n")

    def as_lists(rows):
        return {m: {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()} for m, row in rows.items()}
    (out / "comparison.json").write_text(json.dumps(dict(
        methods=as_lists(summary), attndreambooth_minus=as_lists(paired), cost=costs, vae_ceiling=ceiling or {},
        tests={m: {k: t for (n, k), t in tests.items() if n == m} for m, _ in tests},  # each pair's p, Holm's verdict
        cells=[dict(concept=c, method=m, seed=seed, **o) for (c, m, seed), o in sorted(cells.items(), key=str)]),
        indent=1))
    scatter(scatter_points(summary), out / "scatter.png", size=720, x_label="text alignment", y_label="identity",
            grey=[REFERENCE, FLOOR])  # axes fit the intervals: the methods lie close together
    grid(samples, out / "grid.png")
    return text
