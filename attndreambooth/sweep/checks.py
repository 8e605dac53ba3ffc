"""What scripts/sweep.py refuses before it trains or writes anything: concepts given wrongly, a training
config that would fail in its first cell (a --set typo, a missing folder), an --out it cannot write, an --out
measured with other options, and an --out another sweep is running in."""
import json
from pathlib import Path

from attndreambooth.config.checks import folder_problem
from attndreambooth.config.loading import load_config
from attndreambooth.config.schema import ConfigError
from attndreambooth.sweep.cells import ROOT, UNTRAINED, cell_dir, method_config


def parse_concepts(text):
    """--concepts name=folder:category,... as {name: (folder, category)}, each item checked."""
    concepts = {}
    for item in filter(None, text.split(",")):
        name, _, rest = item.partition("=")
        folder, _, category = rest.rpartition(":")
        if not (name and folder and category):
            raise SystemExit(f"error: --concepts {item!r}: give name=folder:category, e.g. dog=photos/dog:dog")
        if name in concepts:
            raise SystemExit(f"error: --concepts: {name!r} is given twice; each concept needs its own name")
        concepts[name] = (Path(folder), category)
    return concepts


# keys the sweep sets for each cell, and where they come from: a --set of one would train every cell alike
# (outside --out, or on one folder) while the report labels each cell with its own concept
CELL_KEYS = {"output_dir": "--out", "resume": "--out (a cell resumes)", "data.instance_dir": "--concepts/--dreambench",
             "data.category": "--concepts/--dreambench", "data.placeholder": "the method's config",
             "runtime.seed": "--seeds", "prior.class_dir": "--out (class images shared per category)"}


def check_set(items):
    """--set items that a cell's own keys would fight are refused in one line, before anything runs."""
    for item in items:
        key = item.partition("=")[0].strip()
        if key in CELL_KEYS:
            raise SystemExit(f"error: --set {item}: the sweep sets {key} for each cell (from {CELL_KEYS[key]}); "
                             "remove it from --set")


def check_cells(args, cells):
    """Each method's training config as its cells will run it (the concept's folder and category, --set):
    a mistake is named now, not hours in when its first cell starts."""
    check_set(args.set)
    if problem := folder_problem(args.out):
        raise SystemExit(f"error: --out: {problem}")
    for concept, folder, category, method, seed in cells:
        if method in UNTRAINED:
            continue
        run = cell_dir(args.out, concept, method, seed) / "run"
        try:
            load_config(method_config(method), [f"data.instance_dir={folder}", f"data.category={category}",
                                                f"output_dir={run}", *args.set])
        except ConfigError as e:
            raise SystemExit(f"error: cell {concept} / {method}: {e}") from None


PROTOCOL = ("world", "num_images", "num_prompts", "sampler_steps", "base_model", "step_scale", "set", "infer_args",
            "prompt_file", "clip", "dino")  # what a cell's numbers depend on besides its concept, method and seed
# where a recorded model now lives: the first world's left models/shapes when the third world's took that folder,
# so an older first-world sweep resumes from the same weights and is refused the other model under the old name
MOVED = {("shapes", "<repository>/models/shapes"): "<repository>/models/shapes_v1"}


def check_protocol(args):
    """Cells of one OUT are comparable only if measured alike: a run (or report) with other options than
    OUT/protocol.json records is refused once a cell has finished, before anything is trained or overwritten.
    Returns this run's protocol, for the sweep to record once OUT is its own."""
    path, now = Path(args.out) / "protocol.json", {k: getattr(args, k) for k in PROTOCOL}
    now["base_model"] = now["base_model"].replace(str(ROOT), "<repository>")  # a moved clone is the same model
    before = json.loads(path.read_text()) if path.is_file() else None
    if before is not None and (before.get("world"), before.get("base_model")) in MOVED:
        before["base_model"] = MOVED[before["world"], before["base_model"]]
    finished = before is not None and any(Path(args.out).glob("**/eval/metrics.json"))
    if before is not None and before != now and finished:
        keys = ", ".join(f"--{k} {before.get(k)!r} before, {now[k]!r} now" for k in PROTOCOL if before.get(k) != now[k])
        raise SystemExit(f"error: {args.out} holds cells measured with other options ({keys}); use the same "
                         "options to resume or report it, or another --out")
    return now  # with no finished cell there is nothing to mix with: recorded anew


def hold_out(out):
    """Two sweeps on one OUT would train and sample the same cells at once: the second is refused."""
    from attndreambooth.trainer.run_folder import hold_folder
    try:
        return hold_folder(out, "--out", "a running sweep")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
