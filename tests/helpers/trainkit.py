"""A tiny random Llama with a real (tiny, byte-level BPE) tokenizer, saved as a checkpoint folder, for
training tests that need `adapterhub train`'s whole data path without the SmolLM2 import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "Arr, matey, the sea is wide and the sky is blue.",
    "Hello there, how are you today? I am fine, thank you.",
    "Pirates sail the seven seas looking for treasure and rum.",
    "The quick brown fox jumps over the lazy dog again and again.",
]


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_base(folder: Path, *, seed: int = 0, tokenizer: bool = True, **overrides: Any) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with the tiny tokenizer saved at ``folder``."""
    from helpers.models import tiny_llama

    tok = tiny_tokenizer()
    model = tiny_llama(seed, vocab_size=len(tok), max_position_embeddings=256, **overrides)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(str(folder))
    if tokenizer:
        tok.save_pretrained(str(folder))
    return folder


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def text_rows(n: int) -> list[dict[str, str]]:
    """``n`` text rows of different lengths."""
    return [{"text": " ".join(CORPUS[i % 4].split()[: 3 + (i * 5) % 9])} for i in range(n)]
