"""The [V] token (init, positions, the real CLIP tokenizer's "!" padding) and the data pipeline."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from attndreambooth.config.schema import AugmentConfig
from attndreambooth.trainer.concept import ConceptEmbedding, add_concept_token, bake_concept, encode_prompt
from attndreambooth.trainer.data import LatentBatches, augmented_view, load_rgb, to_tensor
from conftest import SHARED


def test_placeholder_starts_as_first_category_subtoken(tiny_pipe):
    tok, te = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    before = te.get_input_embeddings().weight.detach().clone()
    token_id, cat_ids = add_concept_token(tok, te, "<v>", "stuffed animal")
    assert len(cat_ids) == 2 and tok.convert_ids_to_tokens(cat_ids[0]) == "stuffed</w>"
    concept = te.get_input_embeddings()
    assert isinstance(concept, ConceptEmbedding) and torch.equal(concept.row, before[cat_ids[0]])
    input_ids, v_pos, cat_pos = encode_prompt(tok, "a photo of a <v> stuffed animal", token_id, cat_ids)
    assert (v_pos, cat_pos) == (5, 6)
    # the wrapper gives the base rows everywhere and the trainable row at [V]
    with torch.no_grad():
        concept.row.add_(1.0)
        emb = concept(input_ids)
    torch.testing.assert_close(emb[0, 4], before[input_ids[0, 4]])
    torch.testing.assert_close(emb[0, 5], before[cat_ids[0]] + 1.0)
    cond = te(input_ids)[0]
    baked = bake_concept(te).get_input_embeddings()
    assert baked.weight.shape[0] == before.shape[0] + 1 and torch.equal(baked.weight[token_id], concept.row.detach())
    torch.testing.assert_close(te(input_ids)[0], cond)  # same conditioning before and after baking


def test_placeholder_already_in_vocabulary_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="data.placeholder 'dog' already exists"):
        add_concept_token(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "dog", "dog")


def test_prompt_positions_errors(tiny_pipe):
    tok = tiny_pipe.tokenizer
    token_id, cat_ids = add_concept_token(tok, tiny_pipe.text_encoder, "<v>", "dog")
    with pytest.raises(ValueError, match="category must follow"):
        encode_prompt(tok, "a dog photo of <v>", token_id, cat_ids)
    with pytest.raises(ValueError, match="exactly once"):
        encode_prompt(tok, "a photo " * 40 + "of <v> dog", token_id, cat_ids)  # truncated away


@pytest.mark.skipif(not (SHARED / "tokenizers" / "clip" / "vocab.json").is_file(),
                    reason="the real CLIP tokenizer files are not beside this checkout")
def test_real_sd2_tokenizer_pads_with_bang_and_positions_are_found_by_id():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(SHARED / "tokenizers" / "clip")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2))
    token_id, cat_ids = add_concept_token(tok, te, "<v>", "dog")
    input_ids, v_pos, cat_pos = encode_prompt(tok, "a photo of a <v> dog", token_id, cat_ids)
    ids = input_ids[0].tolist()
    assert token_id == 49408 and tok.pad_token == "!" and ids[-1] == tok.pad_token_id == 0
    assert (v_pos, cat_pos) == (5, 6) and ids[7] == tok.eos_token_id and tok.decode([ids[6]]).strip() == "dog"


def test_exif_orientation_and_rgb(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "x.jpg", exif=exif, quality=95)
    Image.new("LA", (8, 8)).save(tmp_path / "gray.png")
    loaded = load_rgb(tmp_path / "x.jpg")
    assert loaded.size == (20, 40) and loaded.mode == "RGB"
    assert loaded.getpixel((10, 2))[2] > 200  # the blue left edge is now on top
    assert load_rgb(tmp_path / "gray.png").mode == "RGB"


def test_augment_without_randomness_is_resize_and_centre_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    off = AugmentConfig(rotate_prob=0, flip_prob=0, random_crop=False)
    got = augmented_view(image, 32, off, random.Random(0))[0]
    want = image.resize((48, 32), Image.BICUBIC).crop((8, 0, 40, 32))
    assert np.array_equal(np.asarray(got), np.asarray(want))
    flipped = augmented_view(image, 32, AugmentConfig(rotate_prob=0, flip_prob=1, random_crop=False), random.Random(0))[0]
    assert np.array_equal(np.asarray(flipped), np.asarray(ImageOps.mirror(want)))
    rotated = augmented_view(image, 32, AugmentConfig(rotate_prob=1, flip_prob=0), random.Random(0))[0]
    assert rotated.size == (32, 32)
    t = to_tensor(got)
    assert t.shape == (3, 32, 32) and -1 <= t.min() and t.max() <= 1


def test_latent_sampler_epochs_views_and_posterior_noise():
    num_images, views = 3, 4
    # pool entry k = image k // views, view k % views, holds the constant k
    mean = torch.arange(num_images * views, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 4, 2, 2).contiguous()
    exact = LatentBatches(mean, torch.zeros_like(mean), num_images, 2.0, torch.Generator().manual_seed(0))
    picked = torch.cat([exact.sample(num_images) for _ in range(8)])[:, 0, 0, 0] / 2.0  # scaling factor undone
    images = (picked // views).view(8, num_images)
    assert all(sorted(row.tolist()) == [0, 1, 2] for row in images)  # each batch of 3 is an epoch
    assert len(set((picked % views).tolist())) == views  # all views get used
    spaced = mean * 100  # constants 100 apart: rounding recovers the exact posterior mean
    noisy = LatentBatches(spaced, torch.full_like(mean, 0.5), num_images, 1.0, torch.Generator().manual_seed(0))
    batch = noisy.sample(600)
    residual = batch - (batch / 100).round() * 100
    assert abs(float(residual.std()) - 0.5) < 0.02 and abs(float(residual.mean())) < 0.02  # 0.5 * N(0, 1)


def test_a_renamed_photo_is_named_as_a_rename():
    """A photo renamed during a paused run was reported as one added and one removed."""
    from attndreambooth.trainer.data import fingerprint_changes
    old = {"a.jpg": [1, "x"], "b.jpg": [2, "y"], "c.jpg": [3, "z"], "e.jpg": [5, "v"]}
    new = {"a2.jpg": [1, "x"], "b.jpg": [2, "y2"], "d.jpg": [4, "w"], "e.jpg": [5, "v"]}
    assert fingerprint_changes(old, new) == "renamed a.jpg -> a2.jpg; added d.jpg; removed c.jpg; changed b.jpg"
    assert fingerprint_changes(old, dict(old)) == ""
    twins = {"p.jpg": [1, "x"], "q.jpg": [1, "x"]}  # two copies renamed: each old name pairs with one new one
    assert fingerprint_changes(twins, {"r.jpg": [1, "x"], "s.jpg": [1, "x"]}) == "renamed p.jpg -> r.jpg, q.jpg -> s.jpg"
