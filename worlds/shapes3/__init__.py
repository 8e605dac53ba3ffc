"""The shapes world, third version: a grammar whose every word has one job, a text encoder pretrained on the
captions alone and then frozen (as Stable Diffusion freezes CLIP), a VAE sized to the world's features, and a
U-Net pretraining watched by gates that stop it when it fails. See docs/reports/shapes_world.md."""
