"""AttnDreamBooth (Pang et al., NeurIPS 2024): three training stages in one process.

    accelerate launch train_attndreambooth.py --config configs/attndreambooth.yaml \
        data.instance_dir=path/to/my_dog data.category=dog output_dir=runs/my_dog

Stage 1 learns the [V] embedding, stage 2 the cross-attention layers, stage 3 the whole
U-Net, each with the cross-attention regulariser (Eq. 2). The run folder ends with
config.yaml, train.log, metrics.jsonl, learned_embeds.safetensors, attn2_<stage>.safetensors
and pipeline/ (a diffusers folder that stock StableDiffusionPipeline loads; for SDXL,
StableDiffusionXLPipeline).
"""
import argparse
import logging
import os
import sys
from pathlib import Path

from attndreambooth.config.loading import load_config, to_yaml
from attndreambooth.config.plan import Plan
from attndreambooth.config.schema import ConfigError
from attndreambooth.trainer.checkpoint import CheckpointError
from attndreambooth.trainer.training import NonFiniteLoss

log = logging.getLogger("attndreambooth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); keys not set there keep their defaults")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. stages.stage3.steps=200")
    return p.parse_intermixed_args(argv)  # options anywhere among the overrides


def main(argv=None, hooks=None):
    """The command line; `hooks` (attndreambooth.trainer.training.Hooks) let tests step into the run."""
    from attndreambooth.families.source import quiet_known_noise
    from attndreambooth.trainer.preflight import check_inputs, fit_memory, plan_text, preflight
    from attndreambooth.trainer.run import Interrupted, run
    from attndreambooth.trainer.finished import complete_finished
    from attndreambooth.trainer.run_folder import missing_outputs
    quiet_known_noise()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = fit_memory(load_config(args.config, args.overrides))  # a card preset is resolved for the model
        plan = Plan(cfg.stages)  # built once, here, from the final config; passed to everything after
        if args.dry_run:
            _, layout = check_inputs(cfg, download=False)  # the same mistakes as a real run reports, nothing written
            print(to_yaml(cfg))
            print(plan_text(cfg, plan, layout))
            return None
        state, paths, lock, work = preflight(cfg, plan)  # data, tokens, run folder, disk: before any weights load
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    if state == "finished" and int(os.environ.get("RANK", 0)) != 0:
        return Path(cfg.output_dir)  # under a launcher, rank 0 alone writes what a finished run still needs
    if state == "finished" and work:  # options that define outputs changed: write those, train nothing
        try:
            complete_finished(cfg, work)
        finally:
            if lock is not None:
                lock.close()
        return Path(cfg.output_dir)
    if state == "finished":
        missing = missing_outputs(cfg, plan)
        if missing:  # saying "nothing to do" would leave the user without them and without a way back
            sys.exit(f"error: {cfg.output_dir} is a finished run, but {', '.join(missing)} "
                     f"{'is' if len(missing) == 1 else 'are'} missing (deleted or moved?) and its trained weights are "
                     "not kept elsewhere (the resume state goes when a run finishes, runtime.keep_resume_state): "
                     "restore them, or train again with resume=false (the run is moved aside, not deleted)")
        log.info("%s is a finished run: nothing to do (resume=false starts it over)", cfg.output_dir)
        return Path(cfg.output_dir)
    try:
        return run(cfg, plan, state, paths, hooks)
    except (NonFiniteLoss, ConfigError, CheckpointError, Interrupted) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # while loading, before any step
        sys.exit("error: interrupted before training started; run the same command to start it")
    finally:
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    main()
