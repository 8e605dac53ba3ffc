r"""AttnDreamBooth (Pang et al., NeurIPS 2024): the three training stages in one process.

    accelerate launch train_attndreambooth.py --config configs/attndreambooth.yaml \
        data.instance_dir=photos/my_dog data.category=dog output_dir=runs/my_dog

    python train_attndreambooth.py --config configs/attndreambooth.yaml \
        data.instance_dir=photos/my_dog data.category=dog output_dir=runs/my_dog --dry_run

Required keys (in the config or as key=value): data.instance_dir (the photos), data.category (the class
word, e.g. dog), output_dir (the run folder). Configs: configs/attndreambooth.yaml (SD 2.1, the paper's
schedule), fast.yaml, sd15.yaml, sdxl.yaml, tiny.yaml (a CPU demo), baselines/, ablations/; every key:
docs/configuration.md. Without --config every key keeps its default (SD 2.1-base, fp32: no mixed precision).

Stage 1 learns the [V] embedding, stage 2 the cross-attention layers, stage 3 the whole U-Net, each with the
cross-attention regulariser (Eq. 2). Running the same command again resumes an interrupted run. The run
folder ends with config.yaml, train.log, metrics.jsonl, learned_embeds.safetensors, attn2_stage2.safetensors
and pipeline/ (a folder that stock diffusers loads).
"""
import logging
import os
import sys
from pathlib import Path

from attndreambooth.cli import Parser

log = logging.getLogger("attndreambooth")


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--config", help="YAML config (see configs/); keys it does not set keep their defaults")
    p.add_argument("--dry_run", action="store_true", help="check the inputs, print the resolved config and the "
                   "plan (parameters, estimated memory per stage), then exit without loading a model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. stages.stage3.steps=200")
    return p.parse_intermixed_args(argv)  # options anywhere among the overrides


def main(argv=None, faults=None):
    """The command line; `faults` (attndreambooth.trainer.method.FaultInjection) let tests step into the run."""
    args = parse_args(argv)  # --help answers before torch is imported
    from attndreambooth.config.loading import load_config, to_yaml
    from attndreambooth.config.plan import Plan
    from attndreambooth.config.schema import ConfigError
    from attndreambooth.families.source import quiet_known_noise
    from attndreambooth.trainer.checkpoint import CheckpointError
    from attndreambooth.trainer.reporting import NonFiniteLoss
    from attndreambooth.trainer.preflight import check_inputs, fit_memory, plan_text, preflight
    from attndreambooth.trainer.run import Interrupted, run
    from attndreambooth.trainer.finished import complete_finished
    from attndreambooth.trainer.run_folder import missing_outputs
    from attndreambooth.trainer.signals import SIGTERM_STOP
    quiet_known_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.config is None:
        log.info("no --config: every key not given as key=value keeps its default (see configs/ and "
                 "docs/configuration.md); that includes fp32 training (runtime.mixed_precision=no)")
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
        # under a launcher every process finds the same mistake: rank 0 alone says it (torchrun then adds its
        # own report of the failed processes)
        sys.exit(f"error: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)
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
        with SIGTERM_STOP:  # a cluster's or `timeout`'s SIGTERM: a checkpoint at the next step, then one line
            return run(cfg, plan, state, paths, faults)
    except (NonFiniteLoss, ConfigError, CheckpointError, Interrupted) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while loading, before any step
        sys.exit("error: interrupted before training started; run the same command to start it")
    finally:
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    main()
