"""What each stage trains, by name: the [V] row(s), the cross-attention layers, the whole U-Net, or a LoRA
adapter's factors (the names also key checkpoints), and the cross-attention layers Eq. 2 averages."""


def row_name(index):
    """The checkpoint name of [V]'s row in the `index`-th text encoder: concept.row, concept.row_2, ..."""
    return "concept.row" if index == 0 else f"concept.row_{index + 1}"


def trainable_parameters(part, unet, text_encoders, family, adapter=None):
    """The parameters, by name, that a stage's `train` entry names: embedding ([V]'s row in each text encoder),
    cross_attention (the family's cross-attention layers), unet; with `adapter` (a LoRA stage) the U-Net parts
    are that adapter's factors; "lora" is every adapter's."""
    from attndreambooth.trainer.lora import adapter_parameters
    if part == "embedding":
        return {row_name(i): encoder.get_input_embeddings().row for i, encoder in enumerate(text_encoders)}
    if part == "lora" or (adapter is not None and part in ("cross_attention", "unet")):
        return {f"unet.{n}": p for n, p in adapter_parameters(unet, adapter).items()}
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if ".lora_" not in n}
    if part == "cross_attention":
        return {n: p for n, p in named.items() if family.is_cross_attention(n)}
    if part == "unet":
        return named
    raise ValueError(f"unknown trainable part {part!r}")


def vae_factor(vae_config):
    """How many times smaller than the image its latent is: the VAE halves it once per block after its first
    (SD's and SDXL's VAEs: 8; the shapes world's: 4). A config object or dict (a config.json read alone)."""
    blocks = vae_config.get("block_out_channels") if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(blocks) - 1)


def latent_side(vae_config, resolution):
    """The latent's side for `resolution` px."""
    return resolution // vae_factor(vae_config)


def map_side(latent, factor):
    """The side of the attention maps of a layer whose grid is `factor` times coarser than a `latent`-wide
    latent: each stride-2 convolution (kernel 3, padding 1) halves the side rounding up (9 -> 5 -> 3 -> 2)."""
    for _ in range(factor.bit_length() - 1):
        latent = (latent + 1) // 2
    return latent


def regularised_layers(family, unet, map_sizes, latent):
    """The cross-attention processor names whose maps Eq. 2 averages: all, or those whose map side for a
    `latent`-wide latent is in `map_sizes`; refuses a selection that matches no layer."""
    layers = family.cross_attention_layers(unet)
    if map_sizes is None:
        return list(layers)
    chosen = [name for name, factor in layers.items() if map_side(latent, factor) in map_sizes]
    if not chosen:
        sizes = sorted({map_side(latent, f) for f in layers.values()}, reverse=True)
        raise ValueError(f"config key 'reg.map_sizes': {list(map_sizes)} matches no cross-attention layer; at this "
                         f"data.resolution (a {latent}x{latent} latent) this U-Net's maps are {sizes} on a side")
    return chosen
