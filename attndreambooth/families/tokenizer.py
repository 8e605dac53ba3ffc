"""A CLIP BPE tokenizer made in code, for the tiny models and the shapes world: the byte alphabet plus one
merge chain per word, so each word of a list is one token, exactly as CLIP's vocabulary holds its words."""
import json
from pathlib import Path

TINY_WORDS = ("a an the of in on with photo picture painting oil drawing sketch watercolor style toy dog cat "
              "bear backpack bowl boot can candle clock sneaker glasses teapot vase stuffed animal cartoon robot "
              "surfing wave beach snow jungle city mountain forest box inside top wooden floor red blue green "
              "purple pink fabric rug street background wheat field house sitting wearing hat").split()


def _bytes_to_unicode():
    """CLIP's byte -> printable character table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder, words=TINY_WORDS, pad_token="!"):
    """A CLIP BPE tokenizer made in code: byte alphabet + merges for a word list (each word becomes one token);
    pads with "!" like SD 2.x (SD 1.x pads with <|endoftext|>)."""
    alphabet = _bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges = list(dict.fromkeys(merges))
    vocab += [m.replace(" ", "") for m in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad_token)))
    return len(vocab)
