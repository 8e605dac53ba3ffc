"""LoRA stages (peft, as diffusers' training scripts do): a stage that trains U-Net weights (cross_attention,
unet) trains low-rank adapters instead when `stages.<name>.lora_rank` > 0.

Every LoRA stage has its own adapter, named after the stage, injected when the run's models are built and
active from then on. An adapter's B factor starts at zero, so it changes nothing until its stage trains it,
and the stages add up as full-weight stages do (stage 3 trains on top of stage 2's cross-attention). The
run's LoRA file is the sum of the adapters, written exactly: per module the factors are concatenated, the
scales folded into A, so `pipe.load_lora_weights(run_dir)` (alpha = rank, scale 1) rebuilds the same U-Net.
"""
import os
import re
import warnings

import torch



def adapter_part(stage):
    """The U-Net part a LoRA stage's adapter covers: the whole block ("unet") or the cross-attention projections."""
    return "unet" if "unet" in stage.train else "cross_attention"


def add_adapters(unet, plan, family):
    """Inject one adapter per LoRA stage of `plan` (fp32 factors, B = 0) on the modules the family's
    `lora_targets` names, and make them all active; returns their names."""
    from peft import LoraConfig

    names = []
    for planned in plan:
        stage = planned.config
        if planned.lora:
            config = LoraConfig(r=stage.lora_rank, lora_alpha=stage.lora_alpha or stage.lora_rank,
                                init_lora_weights="gaussian", target_modules=family.lora_targets[adapter_part(stage)])
            with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(config, adapter_name=planned.name)
            names.append(planned.name)
    if names:
        unet.set_adapters(names)  # all active: an adapter whose stage has not run adds B @ A = 0
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()  # trained in fp32 even over half-precision base weights
    return names


def adapter_parameters(unet, adapter=None):
    """The LoRA factors of one adapter (all adapters for None), by parameter name."""
    pattern = re.compile(r"\.lora_[AB]\." + (re.escape(adapter) if adapter else r"[^.]+") + r"\.")
    return {n: p for n, p in unet.named_parameters() if pattern.search(n)}


@torch.no_grad()
def summed_lora_state_dict(unet, adapters):
    """The adapters as one LoRA in peft's key format ("<module>.lora_A.weight"): per module, A = the scaled A
    factors stacked, B = the B factors side by side, so B @ A is the sum of the adapters' scale * B_i @ A_i."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for module_name, module in unet.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [a for a in adapters if a in module.lora_A]
        if not present:
            continue
        a = torch.cat([module.scaling[n] * module.lora_A[n].weight.float() for n in present], dim=0)
        b = torch.cat([module.lora_B[n].weight.float() for n in present], dim=1)
        state[f"{module_name}.lora_A.weight"] = a.cpu().contiguous()
        state[f"{module_name}.lora_B.weight"] = b.cpu().contiguous()
    return state


def save_lora(unet, adapters, path, family, kohya_path=None):
    """Write the sum of `adapters` as a diffusers LoRA file (the format `load_lora_weights` reads) and, with
    `kohya_path`, in the family's format for ComfyUI, AUTOMATIC1111 and kohya too (where the family has one);
    each under a temporary name, then renamed."""
    from safetensors.torch import save_file

    state = summed_lora_state_dict(unet, adapters)  # peft's key names, which diffusers reads as they are
    tmp = path.with_name(f".tmp-{path.name}")
    family.save_lora_weights(path.parent, state, tmp.name)
    os.replace(tmp, path)
    kohya = None if kohya_path is None else family.kohya_lora(state)
    if kohya is not None:
        tmp = kohya_path.with_name(f".tmp-{kohya_path.name}")
        save_file(kohya, tmp)
        os.replace(tmp, kohya_path)


def merge_adapters(unet):
    """Fold every adapter into the U-Net's own weights and remove the LoRA layers: a plain fp32 U-Net with
    the stock parameter names, as a full-weight run leaves it (half-precision base weights stay rounded)."""
    unet.to(torch.float32)
    unet.fuse_lora(adapter_names=list(unet.peft_config))
    unet.unload_lora()
    return unet


def target_layers(unet, part, family):
    """{name: module} of the linear layers `part`'s adapter adapts (a plain Linear, or one peft wraps already)."""
    pattern = re.compile(family.lora_targets[part])
    return {n: m for n, m in unet.named_modules() if hasattr(m, "in_features") and pattern.fullmatch(n)}


def lora_parameter_count(unet, part, family, rank=1):
    """Trainable parameters of an adapter of `rank` on `part`'s targets (meta device is fine): rank x (in +
    out) for every layer it adapts."""
    return sum(rank * (m.in_features + m.out_features) for m in target_layers(unet, part, family).values())


def narrowest_target(unet, part, family):
    """(name, width) of the narrowest linear layer `part`'s adapter targets, width = min(in, out): a rank above
    it is no longer low-rank (the update B @ A is full rank at that width; the extra rank only adds parameters)."""
    widths = {n: min(m.in_features, m.out_features) for n, m in target_layers(unet, part, family).items()}
    name = min(widths, key=widths.get)
    return name, widths[name]
