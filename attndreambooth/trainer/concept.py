"""The concept's token [V]: a new word in the tokenizer whose embedding row is the one thing stage 1 trains,
the training prompt's token positions the regulariser reads, and the learned row baked in for saving."""
import torch
from torch import nn


class ConceptEmbedding(nn.Module):
    """Token embedding whose [V] row is a trainable parameter; every other row stays frozen.

    Stage 1 trains only this row (docs/method.md); weight decay then touches [V] alone, as in
    the released code, and DDP all-reduces its gradient since it lives in the model.
    """

    def __init__(self, base: nn.Embedding, token_id: int, init: torch.Tensor):
        super().__init__()
        self.base, self.token_id = base, token_id
        self.row = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self):  # the matrix as a plain embedding would hold it, [V] row included
        return merged_embedding_matrix(self)

    def forward(self, input_ids):
        emb = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))  # (B, 77, dim)
        is_concept = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(is_concept, self.row.to(emb.dtype), emb)


def merged_embedding_matrix(concept: ConceptEmbedding):
    """The base embedding matrix with the [V] row written in (grown by one row if needed)."""
    w = concept.base.weight.detach()
    if concept.token_id >= w.shape[0]:
        w = torch.cat([w, w.new_zeros(concept.token_id + 1 - w.shape[0], w.shape[1])])
    w = w.clone()
    w[concept.token_id] = concept.row.detach().to(w.dtype)
    return w


def is_known_word(tokenizer, word):
    """True if `word` is in the vocabulary or tokenizes to one existing token ("dog" is "dog</w>")."""
    return word in tokenizer.get_vocab() or len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def add_concept_token(tokenizer, text_encoder, placeholder, category, init_token=None):
    """Add [V] to the tokenizer and wrap the text encoder's token embedding; [V] starts as the category's
    first sub-token (the released code's choice), or as `init_token`'s. Returns (token id, category
    sub-token ids)."""
    if is_known_word(tokenizer, placeholder) or tokenizer.add_tokens(placeholder) != 1:
        raise ValueError(f"data.placeholder {placeholder!r} already exists in the tokenizer's vocabulary; "
                         "choose a new word, e.g. <v> or sks_token")
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    category_ids = tokenizer(category, add_special_tokens=False).input_ids
    init_id = category_ids[0] if init_token is None else tokenizer(init_token, add_special_tokens=False).input_ids[0]
    base = text_encoder.get_input_embeddings()
    base.requires_grad_(False)
    text_encoder.set_input_embeddings(ConceptEmbedding(base, token_id, base.weight[init_id]))
    return token_id, category_ids


def encode_prompt(tokenizer, prompt, token_id, category_ids, length=None):
    """Token ids (1, length) of the training prompt (default the tokenizer's length: CLIP's 77) and the
    positions of [V] and of the category's first sub-token after it. Found by id: SD 2.x pads with "!", not
    with the end token."""
    length = length or tokenizer.model_max_length
    input_ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids
    ids = input_ids[0].tolist()
    if ids.count(token_id) != 1:
        raise ValueError(f"data.prompt_template: the training prompt {prompt!r} must hold the placeholder "
                         f"exactly once within the tokenizer's {length} tokens")
    v_pos = ids.index(token_id)
    cat_pos = next((i for i in range(v_pos + 1, len(ids)) if ids[i] == category_ids[0]), None)
    if cat_pos is None:
        raise ValueError(f"data.prompt_template: the category must follow the placeholder in the training "
                         f"prompt {prompt!r} (the regulariser compares their attention)")
    return input_ids, v_pos, cat_pos


def bake_concept(text_encoder):
    """Replace the ConceptEmbedding by a plain nn.Embedding holding the learned row (for saving)."""
    concept = text_encoder.get_input_embeddings()
    if isinstance(concept, ConceptEmbedding):
        weight = merged_embedding_matrix(concept)
        text_encoder.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=True))
        text_encoder.config.vocab_size = weight.shape[0]
    return text_encoder
