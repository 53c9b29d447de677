"""Tiny local model + tokenizer shared by the NIAH tests (no downloads): builders, no tests."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(vocab_size: int = 2000, chat: bool = False):
    """Byte-level BPE trained in about a second on the shipped haystack plus needle/question text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from drope.niah import haystack, tasks

    text = haystack.ESSAY_PATH.read_text(encoding="utf-8")
    extra = [tasks.INTRO, tasks.NEEDLE, tasks.QUESTION_ONE, tasks.QUESTION_ALL, tasks.ANSWER_ONE,
             tasks.ANSWER_ALL, haystack.NOISE, " ".join(tasks.KEY_ADJECTIVES), " ".join(tasks.KEY_NOUNS),
             "0123456789 " * 20]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text[:60000]] + extra, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_model(path: Path, *, chat: bool = False, seed: int = 0, **config_overrides) -> Path:
    """A random-weight tiny Llama (hidden 64, 2 layers) and its tokenizer saved under ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    tok = train_tokenizer(chat=chat)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tok), **config_overrides))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
