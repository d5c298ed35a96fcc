"""Tiny randomly initialised models and tokenizers for tests and ``--quick`` runs.

They build in milliseconds and need no download. The word-level tokenizer knows a
fixed vocabulary (anything else maps to ``<unk>``) and carries a ChatML chat template
like SmolLM2's, so chat encoding is exercised exactly as with the real model.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASE_WORDS = ["the", "a", "an", "of", "to", "and", "in", "is", "was", "it", "for", "on", "with", "as", "at", "by", "from", "this", "that", "what", "how", "many", "much", "who", "when", "where", "why", "which", "user", "assistant", "system", "question", "answer", "yes", "no", "not", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "plus", "minus", "times", "equals", "total", "cat", "dog", "bird", "fish", "tree", "river", "city", "car", "road", "house", "book", "story", "song", "music", "film", "game", "red", "blue", "green", "black", "white", "big", "small", "old", "new", "good", "bad", "hot", "cold", "fast", "slow", "alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega", "lambda", "apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum", "run", "walk", "jump", "swim", "read", "write", "sing", "play", "eat", "drink", "sleep", "think", "john", "mary", "paris", "london", "google", "apple_inc", "monday", "july", ".", ",", "?", "!", ":", ";", "(", ")", "=", "+", "-", "*", "/"]


def tiny_tokenizer(extra_words: list[str] | tuple[str, ...] = ()):
    """A word-level fast tokenizer with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    words = list(dict.fromkeys(list(BASE_WORDS) + [str(w) for w in extra_words]))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_causal_lm(vocab_size: int, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama-architecture causal LM (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_token_classifier(
    vocab_size: int, labels: list[str], *, hidden: int = 32, layers: int = 2, seed: int = 0
):
    """A randomly initialised BERT token classifier with the given label names."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
    )
    return BertForTokenClassification(cfg).eval()


def tiny_encoder(words: list[str] | tuple[str, ...]):
    """``(model, tokenizer)``: a tiny random BERT encoder (no head) whose lower-cased
    WordPiece vocabulary is the special tokens plus ``words``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=128))
    return model, tok

