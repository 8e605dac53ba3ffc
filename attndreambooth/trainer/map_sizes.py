"""Sizes: how much smaller than the image its latent is, the side of each cross-attention layer's maps, and
so which layers Eq. 2 reads (`reg.map_sizes`)."""


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


def regularised_layers(family, unet, reg_cfg, latent):
    """The cross-attention processor names whose maps Eq. 2 averages: all the family offers (`reg`'s choice of
    blocks on a transformer), or those whose map side for a `latent`-wide latent is in `reg.map_sizes`;
    refuses a selection that matches no layer."""
    layers, map_sizes = family.map_layers(unet, reg_cfg), reg_cfg.map_sizes
    if map_sizes is None:
        return list(layers)
    chosen = [name for name, factor in layers.items() if map_side(latent, factor) in map_sizes]
    if not chosen:
        sizes = sorted({map_side(latent, f) for f in layers.values()}, reverse=True)
        raise ValueError(f"config key 'reg.map_sizes': {list(map_sizes)} matches no cross-attention layer; at this "
                         f"data.resolution (a {latent}x{latent} latent) this U-Net's maps are {sizes} on a side")
    return chosen
