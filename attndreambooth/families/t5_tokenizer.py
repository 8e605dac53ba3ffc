"""A T5 tokenizer made in code, for the tiny FLUX.1 model: a Unigram vocabulary of whole words ("▁dog") and
single characters, with T5's special tokens (<pad> 0, </s> 1, <unk> 2), its Metaspace pre-tokenizer and its
"</s>" after every text, so a word of the list is one token as in T5's own vocabulary."""
from attndreambooth.families.tokenizer import TINY_WORDS

CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789<>_-.,!'[]()"


def write_tiny_t5_tokenizer(folder, words=TINY_WORDS, model_max_length=512):
    """Save the tokenizer to `folder` (tokenizer.json + tokenizer_config.json); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(words)] + [(c, -5.0) for c in CHARACTERS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = T5Tokenizer(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return len(vocab)
