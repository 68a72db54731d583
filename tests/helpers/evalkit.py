"""Helpers of the evaluation tests: a tiny random Llama saved with a character-level tokenizer (so text
rows, chat templates and generation run end to end with no download), and PEFT adapters for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.models import make_adapter, save_model, tiny_llama

CHARS = list(" abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'-+=()\n")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def char_tokenizer() -> Any:
    """A fast tokenizer mapping every character to one token; ``<s>`` is prepended as BOS."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = TEMPLATE
    return fast


def tiny_checkpoint(dest: Path, seed: int = 0) -> Path:
    """A tiny random Llama (vocab sized to the tokenizer) saved with its tokenizer."""
    tok = char_tokenizer()
    model = tiny_llama(seed, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 3
    save_model(model, dest, extras=False)
    tok.save_pretrained(dest)
    return dest


def adapters_for(folder: Path, root: Path, n: int, **kw: Any) -> list[Path]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for i in range(n):
        p = make_adapter(model, root / f"ad{i}", seed=10 + i, **kw)
        out.append(p)
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPT_ROWS = [
    {"prompt": "q: what is one plus one? a:", "completion": " two"},
    {"prompt": "q: capital of france? a:", "completion": " paris"},
    {"prompt": "q: colour of sky? a:", "completion": " blue"},
    {"prompt": "count: 1 2 3", "completion": " 4 5"},
    {"prompt": "hello", "completion": " world, again"},
]
CHOICE_ROWS = [
    {"prompt": "q: 2+2= ", "choices": ["4", "5", "22"], "answer": 0},
    {"prompt": "the sky is", "choices": [" blue", " green"], "answer": " blue"},
    {"prompt": "cats say", "choices": [" meow", " woof", " moo"], "answer": 0},
    {"prompt": "a b c", "choices": [" d", " e"], "answer": 1},
]
MESSAGE_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {
        "messages": [
            {"role": "system", "content": "be short"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
TEXT_ROWS = [{"text": "the quick brown fox"}, {"text": "jumps over the lazy dog."}]
