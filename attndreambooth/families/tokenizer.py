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


def _bpe(symbols, ranks):
    """CLIP's BPE on one word's symbols: merge the adjacent pair of lowest rank, everywhere, until none has one."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and ranks.get((symbols[i], symbols[i + 1])) == rank:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _word_merges(words, whole_words):
    """Merges that make each word one token: a chain per word, left to right; with `whole_words`, repaired
    where another word's merges cut into it ("st" + "r" of "striped" loses to "r" + "i" of "right"): a
    merge of the pieces it is left in is added at the end, where it applies only once nothing else does."""
    merges = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges = list(dict.fromkeys(merges))
    for _ in range(64 if whole_words else 0):
        ranks = {m: i for i, m in enumerate(merges)}
        split = [_bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks) for w in words]
        split = [s for s in split if len(s) > 1]
        if not split:
            break
        merges += list(dict.fromkeys((s[0], s[1]) for s in split if (s[0], s[1]) not in ranks))
    return merges


def write_tiny_tokenizer(folder, words=TINY_WORDS, pad_token="!", whole_words=False):
    """A CLIP BPE tokenizer made in code: byte alphabet + merges for a word list; pads with "!" like SD 2.x
    (SD 1.x pads with <|endoftext|>). With `whole_words` every word is exactly one token (the shapes world:
    its metrics find a word's attention map by its token); without, a word that another word's merges cut
    into stays a few tokens, as the tiny models were built (their files must not change)."""
    alphabet = _bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = [f"{a} {b}" for a, b in _word_merges(list(dict.fromkeys(words)), whole_words)]
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
