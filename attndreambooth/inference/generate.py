"""Sampling prompts into folders: each prompt's images, grid, record and (optionally) attention maps, in a
folder named by the prompt and the model that samples it (infer.py's output)."""
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL.PngImagePlugin import PngInfo

from attndreambooth.config.schema import RegConfig
from attndreambooth.families import of_pipeline
from attndreambooth.inference.attention_maps import figure, token_labels
from attndreambooth.inference.sampling import image_grid, sample_prompts

log = logging.getLogger("infer")


def slug(text, n=60):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "prompt"


PIXEL_SETTINGS = ("seed", "steps", "guidance_scale", "negative_prompt", "height", "width")  # besides the source's


def prompt_folder(template, source, settings=None):
    """A prompt's folder name: its slug (readable) and 8 hex digits of a hash of the exact prompt, the model
    that samples it (`source`: run, stage, weights, sampler, dtype) and the settings that change the pixels
    (PIXEL_SETTINGS of `settings`), so prompts that slug alike ("a {} dog!", "A {} DOG?", emoji, a shared first
    60 characters), and the same prompt from another stage, model, sampler, dtype, seed, step count, guidance
    or size, never share one."""
    pixels = {k: (settings or {}).get(k) for k in PIXEL_SETTINGS}
    key = json.dumps(dict(template=template, **(source or {}), **pixels), sort_keys=True)
    return f"{slug(template.replace('{}', 'V'))}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def concept_position(tokenizer, template, placeholder):
    """Token position of "[V]" when `{}` of `template` is filled with it (start token included)."""
    before = template.split("{}")[0]
    return len(tokenizer(before).input_ids) - 1  # the end token is not counted; [V] follows `before`


def cut_words(tokenizer, text):
    """(the end of what the text encoder reads, what is cut) for a prompt over its tokens, else None."""
    ids = tokenizer(text, truncation=False).input_ids  # with the start and end tokens
    keep = tokenizer.model_max_length - 2
    if len(ids) - 2 <= keep:
        return None
    return tokenizer.decode(ids[keep - 3:keep + 1]).strip(), tokenizer.decode(ids[keep + 1:-1]).strip()


OUTPUT_FILES = ("[0-9][0-9][0-9].png", "grid.png", "prompt.json", "attention.png", "attention_maps.npz")


def generate(pipe, concept, prompts, out_dir, num_images=4, seed=0, attention_maps=False, model="", source=None,
             **settings):
    """Sample `num_images` per prompt into out_dir/<slug>-<hash>/ (see prompt_folder); returns {prompt: [PIL
    images]}. `source` says which model samples (run, stage, weights files): recorded in prompt.json and every
    PNG, and part of the folder's name with the settings that change the pixels. A prompt's folder is written
    only once its images exist; an earlier call's images of the same prompt, model and settings there are
    replaced, and the log says so."""
    out_dir, results = Path(out_dir), {}
    first = (concept or "").split(" ")[0]
    placeholder = first if first in pipe.tokenizer.get_added_vocab() else None  # None: a base model alone
    source = dict(source or {}, model=model)
    for template in prompts:
        if "{}" in template and concept is None:
            raise ValueError(f"prompt {template!r} has {{}} but there is no concept: give --category (the word {{}} "
                             "stands for on a base model)")
        if placeholder is not None and "{}" not in template:
            log.warning("prompt %r has no {} placeholder: the learned concept is not used", template)
        elif (placeholder is not None
              and concept_position(pipe.tokenizer, template, placeholder) >= pipe.tokenizer.model_max_length - 1):
            log.warning("prompt %r: the concept falls past the text encoder's %d tokens and is cut off",
                        template, pipe.tokenizer.model_max_length)
    texts = [template.replace("{}", concept or "") for template in prompts]
    for text in texts:
        if cut := cut_words(pipe.tokenizer, text):
            log.warning("prompt %r is longer than the text encoder's %d tokens: it reads up to %r; %r is cut",
                        text, pipe.tokenizer.model_max_length, cut[0], cut[1])
    for index, images, maps in sample_prompts(pipe, texts, num_images, seed, attention_maps=attention_maps, **settings):
        template, prompt = prompts[index], texts[index]
        folder = out_dir / prompt_folder(template, source, dict(settings, seed=seed))
        folder.mkdir(parents=True, exist_ok=True)
        earlier = [f for pattern in OUTPUT_FILES for f in folder.glob(pattern)]
        if earlier:
            log.info("%s: replacing an earlier call's %d files there (same prompt, model and settings)", folder,
                     len(earlier))
        for old in earlier:
            old.unlink()  # an earlier call's images must not mix with this call's
        record = dict(prompt=prompt, template=template, placeholder=placeholder, seed=seed,
                      num_images=num_images, **settings, **source)
        for i, image in enumerate(images):
            info = PngInfo()
            info.add_text("parameters", json.dumps(dict(record, seed=seed + i, index=i)))
            image.save(folder / f"{i:03d}.png", pnginfo=info)
        image_grid(images).save(folder / "grid.png")
        (folder / "prompt.json").write_text(json.dumps(record, indent=1))
        if attention_maps:
            family = of_pipeline(pipe)
            tokenizer = family.tokenizers(pipe)[family.map_tokenizer]
            ids = tokenizer(prompt, padding="max_length", max_length=maps.shape[1], truncation=True,
                            return_tensors="pt").input_ids[0]
            labels = token_labels(tokenizer, ids)
            np.savez_compressed(folder / "attention_maps.npz", maps=maps.numpy(), input_ids=ids.numpy(),
                                positions=np.array([p for p, _ in labels]), tokens=np.array([t for _, t in labels]))
            layers = len(family.map_layers(family.denoiser(pipe), RegConfig()))  # SD 2.x: 16, SDXL: 70, FLUX.1: 19
            title = f"{prompt}  |  model: {model}  |  {family.maps_title}, mean over heads, {layers} layers, steps"
            figure(images, maps, labels, title).save(folder / "attention.png")
        results[prompt] = images
        log.info("%s: %d images in %s", prompt, len(images), folder)
    return results
