"""The diffusers U-Net's naming, owned here: which of its layers are cross-attention layers (`attn2`), how far
each one's query grid is downsampled, which parameters belong to them, and the module names a LoRA adapter
wraps. Every family built on UNet2DConditionModel (SD 1.x/2.x, SDXL) answers with these; a transformer
family would answer with its own."""
CROSS_ATTENTION = ".attn2."  # diffusers' name for a transformer block's cross-attention
LORA_TARGETS = {  # the modules an adapter wraps, by the part the stage names (peft full-matches these on module names)
    "cross_attention": r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)",  # the cross-attention projections
    "unet": r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.(0\.proj|2)",  # attention and feed-forward
}


def is_cross_attention(name):
    """True for a processor, module or parameter name inside a cross-attention layer."""
    return CROSS_ATTENTION in name


def cross_attention_layers(unet):
    """{attn2 processor name: how many times smaller its query grid is than the latent (1, 2, 4, 8)}, in
    forward order; at 512 px SD 2.x has 16 layers at 64/32/16/8, at 1024 px SDXL-base 70 at 64/32."""
    def factor(name):
        part, index = name.split(".")[:2]
        if part == "down_blocks":
            return 2 ** int(index)
        if part == "up_blocks":
            return 2 ** (len(unet.up_blocks) - 1 - int(index))
        return 2 ** (len(unet.down_blocks) - 1)  # mid_block

    return {name: factor(name) for name in unet.attn_processors if is_cross_attention(name)}


def cross_attention_state(unet):
    """The cross-attention layers' weights, by state-dict name (what a cross_attention stage trains and saves)."""
    return {n: p for n, p in unet.state_dict().items() if is_cross_attention(n)}
