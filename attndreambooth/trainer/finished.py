"""A rerun of a finished run with changed options: what each change means once training is over. An option
that acts only while training is named as such (nothing is trained again); an output an option defines is
written from what the run saved (a merged pipeline from the base, the embedding and the LoRA file; the
pipeline in a narrower dtype), or refused with the reason where the run no longer holds what it needs. The
run's config.yaml and finished.json then record the outputs the folder holds."""
import json
import logging
import os
from pathlib import Path

import yaml

from attndreambooth.config.plan import DTYPES, LORA_FILE
from attndreambooth.config.schema import ConfigError
from attndreambooth.trainer.run_folder import FINISHED_FILE, recorded_config

log = logging.getLogger(__name__)
OUTPUT_KEYS = ("runtime.save_merged_pipeline", "runtime.pipeline_dtype")  # the options that define files
BITS = {"fp32": 32, "fp16": 16, "bf16": 16}


def finished_work(cfg, plan, changes):
    """What a rerun of the finished run in cfg.output_dir does for its changed options (`changes`: (key, in
    the run, now)): [] (nothing), or 'merge' (write pipeline/ from the base, the embedding and the adapters,
    in runtime.pipeline_dtype), or 'recast' (write pipeline/ again in runtime.pipeline_dtype). Refuses what
    cannot be done truthfully; reads no weights."""
    out, work = Path(cfg.output_dir), []
    changed = {key: (old, new) for key, old, new in changes if key != "output_dir"}
    for key, (old, new) in changed.items():
        if key not in OUTPUT_KEYS:
            log.info("%s changed (%r -> %r): it acts only while training, and the run has finished; nothing to "
                     "redo for it", key, old, new)
    has_pipeline = (out / "pipeline" / "model_index.json").is_file()
    merged, dtype = changed.get("runtime.save_merged_pipeline"), changed.get("runtime.pipeline_dtype")
    if merged and not plan.lora:
        log.info("runtime.save_merged_pipeline changed: it acts only on LoRA runs (this run saved its whole "
                 "pipeline/ anyway); nothing to redo for it")
    elif merged and merged[1] and not has_pipeline:
        work.append("merge")
    elif plan.lora and cfg.runtime.save_merged_pipeline and not has_pipeline and (out / LORA_FILE).is_file():
        log.info("the run's merged pipeline/ is missing (deleted or moved?): merging it again from the adapters")
        work.append("merge")
    elif merged and not merged[1]:
        log.info("runtime.save_merged_pipeline=false: %s", "the run's merged pipeline/ is kept (delete it yourself "
                 "if you do not want it; a rerun deletes nothing)" if has_pipeline else "nothing to redo for it")
    if dtype and not work and has_pipeline:
        if plan.lora:  # merged again from the base and the adapters: any dtype is as exact as at the end of training
            work.append("merge")
        elif BITS[dtype[1]] > BITS[dtype[0]] or {dtype[0], dtype[1]} == {"fp16", "bf16"}:
            raise ConfigError(f"runtime.pipeline_dtype={dtype[1]}: the run's pipeline/ was saved in {dtype[0]}, and "
                              "the fp32 weights it came from went with the resume state when the run finished; a "
                              f"{dtype[1]} copy would be made of {dtype[0]} values, not of the trained ones. Keep "
                              f"runtime.pipeline_dtype={dtype[0]}, or train again (resume=false moves this run aside)")
        else:
            work.append("recast")
    elif dtype and not work:
        log.info("runtime.pipeline_dtype changed: it sets the dtype of pipeline/, which this LoRA run does not "
                 "save (runtime.save_merged_pipeline=false); nothing to redo for it")
    return work


def complete_finished(cfg, work):
    """Do `work` (finished_work's answer) in cfg.output_dir, then record the output options in its config.yaml."""
    from attndreambooth.families.source import load_pipeline, replace_pipeline
    from attndreambooth.config.schema import ModelConfig
    from attndreambooth.inference.loading import load_unet_weights, quiet_libraries
    out, dtype = Path(cfg.output_dir), DTYPES[cfg.runtime.pipeline_dtype]
    if "merge" in work:
        pipe, family = load_pipeline(cfg.model, DTYPES["fp32"])  # the base as training loaded it, its scheduler kept
        with quiet_libraries():
            family.load_embedding(pipe, out / "learned_embeds.safetensors", cfg.data.placeholder)
        load_unet_weights(pipe, out / LORA_FILE)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        how = f"merged from {cfg.model.pretrained}, learned_embeds.safetensors and {LORA_FILE}"
    else:
        pipe, _ = load_pipeline(ModelConfig(pretrained=str(out / "pipeline")), DTYPES["fp32"])
        how = "cast from the pipeline the run saved"
    replace_pipeline(pipe, out / "pipeline", dtype)
    text = (out / "config.yaml").read_text()
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))  # "# trained by N processes"
    record = recorded_config(out)  # the training's own record, not a hand-edited config.yaml
    for key in OUTPUT_KEYS:
        record["runtime"][key.split(".")[1]] = getattr(cfg.runtime, key.split(".")[1])
    (out / ".tmp-config.yaml").write_text(header + yaml.safe_dump(record, sort_keys=False))
    os.replace(out / ".tmp-config.yaml", out / "config.yaml")
    finished = json.loads((out / FINISHED_FILE).read_text())
    if isinstance(finished.get("config"), dict):  # a run from before records were kept has none to update
        (out / ".tmp-finished.json").write_text(json.dumps(dict(finished, config=record), indent=1))
        os.replace(out / ".tmp-finished.json", out / FINISHED_FILE)
    log.info("saved %s in %s (%s); the run is not trained again", out / "pipeline", cfg.runtime.pipeline_dtype, how)
