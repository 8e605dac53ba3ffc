"""How good a finished third-world model is, measured against the issue's targets and beside the first world's.

    python -m worlds.shapes3.report runs/shapes3            # writes report.json, samples.png, attention.png

- held-out captions (200, one image each, DPM++ 25 steps, CFG 7.5) read back attribute by attribute (colour also
  by how the caption says it), beside what the readers give the scenes' own renders, with the shape word's
  attention IoU (and the second object's word's), entropy and shape-background correlation;
- the VAE's round trip (300 scenes, each concept's 8 photos);
- each concept's best-caption floor (worlds.shapes3.bench.caption_floor): the identity of "a big {words}
  {category}" for the captions a user could write (the category alone, each appearance word, its pattern word
  with the palette colours nearest its own), 8 images each, the best kept; stripe_square is the control that no
  single word reaches.
"""
import argparse
import json
import sys
from pathlib import Path

from worlds.shapes3.bench import caption_floor
from worlds.shapes3.gates import ceiling, held_out_scenes, read_back, vae_round_trip
from worlds.shapes3.scene import CONCEPTS

STEPS, CFG = 25, 7.5
TARGETS = {"shape": 0.90, "colour": 0.90, "background": 0.90, "pattern": 0.90, "second": 0.80, "position": 0.70,
           "shape iou": 0.5, "second iou": 0.4}
FIRST_WORLD = {"background": 0.635, "shape": 0.23, "colour": 0.855, "size": 0.92, "position": 0.26, "second": 0.67}


def measure(folder, captions=200, log=print):
    from worlds.shapes.world_report import attention_figure, sample_grid
    from attndreambooth.inference.loading import load_pipe
    pipe = load_pipe(base=folder)[0]
    pipe.set_progress_bar_config(disable=True)
    report = {"vae round trip": vae_round_trip(pipe.vae)}
    log(f"vae round trip: {json.dumps(report['vae round trip'])}")
    scenes = held_out_scenes(captions, seed=1)
    report["held out"] = dict(captions=captions, **read_back(pipe, scenes, steps=STEPS))
    report["held out ceiling"] = ceiling(scenes)  # the readers on the scenes' own renders
    log(f"held-out captions: {json.dumps(report['held out'])}; a perfect model's: {json.dumps(report['held out ceiling'])}")
    report["floor"] = caption_floor(pipe, CONCEPTS, steps=STEPS, cfg=CFG)
    log(f"best-caption floors: {json.dumps({c: (f['caption'], f['best caption']) for c, f in report['floor'].items()})}")
    report["targets"] = {k: dict(target=v, measured=report["held out"].get(k),
                                 met=(report["held out"].get(k) or 0) >= v) for k, v in TARGETS.items()}
    report["beats the first world"] = all(report["held out"].get(k, 0) > v for k, v in FIRST_WORLD.items())
    sample_grid(pipe, Path(folder) / "samples.png", scenes=held_out_scenes(12, seed=2))
    attention_figure(pipe, Path(folder) / "attention.png", caption="a big harlequin star on the left on a blue "
                                                                   "background next to a yellow circle")
    (Path(folder) / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m worlds.shapes3.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a finished model folder of `python -m worlds.shapes3`")
    p.add_argument("--captions", type=int, default=200)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not (Path(args.model) / "model_index.json").is_file():
        p.error(f"{args.model} holds no finished model (no model_index.json)")
    measure(args.model, args.captions)


if __name__ == "__main__":
    main()
