"""The released code's way of computing a step, kept to measure against (scripts/benchmark.py) and
to test that the fast path computes the same thing: eager softmax attention in every layer with
the full 77-column maps kept, the VAE encoding the batch and the text encoder running on it at
every step."""
import torch
from diffusers.models.attention_processor import AttnProcessor

from attention_reg import SD_CROSS_ATTENTION_LAYERS, CaptureProcessor
from attndreambooth.families.unet import is_cross_attention


class ReferenceCapture:
    """Like CrossAttentionCapture, but every layer runs eager attention (no SDPA) and the cross-attention
    maps are kept whole, (B, heads, HW, 77); `.maps` hands out the requested columns."""

    def __init__(self, unet, token_indices, expected_layers=SD_CROSS_ATTENTION_LAYERS):
        self.unet, self.token_indices, self.expected_layers = unet, list(token_indices), expected_layers
        self.full_maps, self._original = [], None

    @property
    def maps(self):
        return [m[..., self.token_indices] for m in self.full_maps]

    def __enter__(self):
        self._original = dict(self.unet.attn_processors)
        cross = CaptureProcessor(self.full_maps.append, None)
        eager = AttnProcessor()  # materialises the softmax maps of self-attention too
        processors = {n: cross if is_cross_attention(n) else eager for n in self._original}
        assert self.expected_layers is None or sum(p is cross for p in processors.values()) == self.expected_layers
        self.unet.set_attn_processor(processors)
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(dict(self._original))
        return False

    def clear(self):
        self.full_maps.clear()


class EncodeEveryStep:
    """A LatentBatches stand-in that runs the VAE on a batch of (pre-augmented) pixels at every step;
    `autocast` is a callable giving a fresh autocast context (e.g. accelerator.autocast)."""

    def __init__(self, vae, pixels, scaling_factor, generator, autocast):
        self.vae, self.pixels, self.scale, self.gen, self.autocast = vae, pixels, scaling_factor, generator, autocast

    @torch.no_grad()
    def sample(self, batch_size, with_geometry=False):
        """Latents; with `with_geometry`, also the view geometry (SDXL's size/crop ids) of uncropped views at the
        pixels' size."""
        index = torch.randint(len(self.pixels), (batch_size,), generator=self.gen)
        pixels = self.pixels[index.to(self.pixels.device)]
        with self.autocast():
            dist = self.vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=self.gen).to(dist.mean.device)
        latents = (dist.mean.float() + dist.std.float() * eps) * self.scale
        if not with_geometry:
            return latents
        h, w = pixels.shape[-2:]
        return latents, torch.tensor([[h, w, 0, 0, h, w]] * batch_size, dtype=torch.float32, device=latents.device)
