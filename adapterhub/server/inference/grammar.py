"""Constrained decoding through llguidance (the ``structured`` extra): ``response_format`` ``json_object`` /
``json_schema``, and ``tools`` with ``tool_choice`` ``required`` or a named function, whose answer is
held to ``{"name": ..., "arguments": {...}}`` for one of the tools (the tools themselves reach the model
through the chat template's own tool format).

A request's grammar is checked in the route (an invalid schema is a 400 naming ``response_format`` or
``tools``); each job gets its own matcher. Each step the scheduler masks the row's logits to the tokens
the grammar allows (`mask`), picks, and feeds the token back (`advance`); a grammar that is complete
ends the answer (finish reason ``stop``, or ``tool_calls``).
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .refusal import Refusal

__all__ = [
    "Grammars",
    "advance",
    "bare_tool_grammar",
    "call_schema",
    "lazy_tool_grammar",
    "mask",
    "response_schema",
    "tool_schema",
    "trigger_grammar",
]

#: JSON written compactly, as OpenAI's structured outputs are (llguidance's ``x-guidance`` options)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """The llguidance view of one tokenizer (built once, on first use: about a second)."""

    def __init__(self, tokenizer: Any, vocab: int, eos: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        #: the tokens that end an answer (the engine's: the generation config's, else the tokenizer's); a
        #: grammar that may end allows every one of them
        self.eos = eos or None
        self._ll: Any = None
        self._specials: list[int] | None = None
        self._lock = threading.Lock()

    def _lltok(self) -> Any:
        with self._lock:
            return self._lltok_unlocked()

    def _lltok_unlocked(self) -> Any:
        if self._ll is None:
            import llguidance.hf

            eos = self.eos or self.tokenizer.eos_token_id
            self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab, eos_token=eos)
        return self._ll

    def compile(self, schema: dict[str, Any], param: str, lark: str | None = None) -> str | Refusal:
        """A grammar for JSON matching ``schema`` (written compactly, as OpenAI's structured outputs are,
        unless the schema's own ``x-guidance`` says otherwise), or for the Lark grammar ``lark`` when given
        (``schema`` is then only what it embeds); or a 400 naming ``param``."""
        if not self.available():
            return Refusal(
                400,
                f"{param} needs llguidance on the server (pip install 'adapterhub[structured]')",
                param=param,
                code="unsupported_parameter",
            )
        import llguidance

        try:
            if lark is not None:
                grammar = llguidance.LLMatcher.grammar_from_lark(lark)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema({"x-guidance": COMPACT, **schema})
            ok, why = _valid(llguidance.LLMatcher.validate_grammar(grammar, self._lltok()))
        except Exception as exc:  # the schema is not one llguidance reads
            return Refusal(400, f"{param}: the JSON schema is not usable: {exc}", param=param)
        if not ok:
            return Refusal(400, f"{param}: the JSON schema is not usable: {why}", param=param)
        return str(grammar)

    def specials(self) -> list[int]:
        """The tokenizer's added tokens (llguidance reads them as special ones), less the end tokens."""
        with self._lock:
            if self._specials is None:
                ll = self._lltok_unlocked()
                ends = set(self.eos or [self.tokenizer.eos_token_id])
                added: list[int] = list(getattr(self.tokenizer, "get_added_vocab", dict)().values())
                self._specials = sorted(
                    i for i in added if i < self.vocab and i not in ends and ll.is_special_token(i)
                )
            return self._specials

    @staticmethod
    def available() -> bool:
        """Whether llguidance is installed (the ``structured`` extra)."""
        return importlib.util.find_spec("llguidance") is not None

    def matcher(self, grammar: str) -> Any:
        import llguidance

        return llguidance.LLMatcher(self._lltok(), grammar)


def _valid(result: Any) -> tuple[bool, str]:
    if isinstance(result, tuple):
        ok, why = result[0], result[1]
        return bool(ok), str(why)
    return not result, str(result or "")


def response_schema(response_format: dict[str, Any]) -> dict[str, Any] | Refusal | None:
    """The JSON schema ``response_format`` asks for (None: plain text)."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            return Refusal(
                400, "response_format.json_schema needs a name and a schema", param="response_format"
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            return Refusal(
                400, "response_format.json_schema.schema must be an object", param="response_format"
            )
        return schema
    return Refusal(400, "response_format.type is text, json_object or json_schema", param="response_format")


def call_schema(
    tools: list[dict[str, Any]], name: str | None = None, key: str = "arguments"
) -> dict[str, Any] | Refusal:
    """The schema of one call ``{"name": ..., "arguments": {...}}`` of one of ``tools`` (of the one named
    ``name``, when given; ``key``: the arguments' key, ``parameters`` in Llama's format), or a 400 naming
    the tool that is not ``{type: function, function: {name, parameters}}``."""
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(f, dict) or not isinstance(f.get("name"), str):
            return Refusal(
                400,
                f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}",
                param=f"tools[{i}]",
            )
        params = f.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            return Refusal(400, f"tools[{i}].function.parameters must be a JSON schema", param=f"tools[{i}]")
        functions.append((f["name"], params))
    if name is not None:
        functions = [(n, p) for n, p in functions if n == name]
        if not functions:
            return Refusal(400, f"tool_choice names no tool of this request: {name!r}", param="tool_choice")
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, key: p},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for n, p in functions
    ]
    return one[0] if len(one) == 1 else {"anyOf": one}


def tool_schema(tools: list[dict[str, Any]], choice: Any) -> tuple[dict[str, Any] | None, Refusal | None]:
    """The schema of a forced tool call (``tool_choice`` ``required`` or ``{"type": "function", "function":
    {"name"}}``), None when the model may answer in text (``auto``/``none``/unset)."""
    name = None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        name = name if isinstance(name, str) else ""
    elif choice not in (None, "auto", "none", "required"):
        return None, Refusal(
            400, "tool_choice is none, auto, required or a named function", param="tool_choice"
        )
    schema = call_schema(tools, name)
    if isinstance(schema, Refusal):
        return None, schema
    return (None if choice in (None, "auto", "none") else schema), None


def lazy_tool_grammar(
    schema: dict[str, Any],
    parallel: bool,
    open_id: int | None = None,
    close_id: int | None = None,
    specials: Sequence[int] = (),
) -> str:
    """A Lark grammar (llguidance's) for an answer that is free text, or text up to ``<tool_call>`` and then
    calls ``<tool_call>{json}</tool_call>`` matching ``schema``: the grammar is lazy, it holds the model to
    nothing until the trigger ``<tool_call>`` appears; after it, the call must be valid JSON for one of the
    tools and nothing but more calls (``parallel``) may follow. ``open_id`` / ``close_id``: the tags' ids
    where the tokenizer has them as added tokens (Qwen's, Hermes'): llguidance reads an added token as a
    special one, written ``<[id]>`` in the grammar and never inside text. ``specials``: the special tokens
    free text may hold (``<think>``, say): all but the tags and the end tokens."""
    body = json.dumps({"x-guidance": COMPACT, **schema})
    opening = f"<[{open_id}]>" if open_id is not None else '"<tool_call>"'
    closing = f"<[{close_id}]>" if close_id is not None else '"</tool_call>"'
    one = f'"\\n"? call "\\n"? {closing}'
    more = f' ("\\n"? {opening} {one})*' if parallel else ""
    trigger = f"free {opening}" if open_id is not None else "free trigger"
    item, special = _specials(specials)
    return (
        "%llguidance {}\n"
        f"start: free | {trigger} {one}{more}\n"
        f"free: {item}*\n"
        f"call: %json {body}\n"
        + ("" if open_id is not None else 'trigger[lazy]: ANY "<tool_call>"\n')
        + special
        + "TEXT: /(.|\\n)+/\nANY: /(.|\\n)*/\n"
    )


def bare_tool_grammar(
    schema: dict[str, Any], parallel: bool, python_tag: int | None = None, specials: Sequence[int] = ()
) -> str:
    """A Lark grammar (llguidance's) for Llama 3's tool format: an answer that opens with ``{`` (after
    blanks, and ``<|python_tag|>`` where the vocabulary has it, id ``python_tag``) is calls
    ``{"name": ..., "parameters": {...}}`` matching ``schema``, ``;``-separated (``parallel``); any other
    answer is free text (holding ``specials``, as `lazy_tool_grammar`'s)."""
    body = json.dumps({"x-guidance": COMPACT, **schema})
    tag = f"<[{python_tag}]>? " if python_tag is not None else ""
    more = ' ("; " call)*' if parallel else ""
    item, special = _specials(specials)
    lead = "FIRST | WS? special" if special else "FIRST"
    return (
        "%llguidance {}\n"
        f"start: free | WS? {tag}call{more}\n"
        f"free: WS? | ({lead}) {item}*\n"
        f"call: %json {body}\n" + special + "FIRST: /[ \\t\\r\\n]*[^{ \\t\\r\\n](.|\\n)*/\n"
        "TEXT: /(.|\\n)+/\n"
        "WS: /[ \\t\\r\\n]+/\n"
    )


def trigger_grammar(
    trigger: str, trigger_id: int | None, calls: str, rules: str, specials: Sequence[int] = ()
) -> str:
    """A Lark grammar (llguidance's) for an answer that is free text, or text up to ``trigger`` and then
    ``calls`` (a Lark expression over ``rules``), lazy as `lazy_tool_grammar` is: nothing is held until the
    trigger appears (``trigger_id``: its id where the vocabulary has it as an added token)."""
    item, special = _specials(specials)
    lead = f"free <[{trigger_id}]>" if trigger_id is not None else "free trigger"
    lazy = "" if trigger_id is not None else f"trigger[lazy]: ANY {json.dumps(trigger, ensure_ascii=False)}\n"
    return (
        "%llguidance {}\n"
        f"start: free | {lead} {calls}\n"
        f"free: {item}*\n" + rules + lazy + special + "TEXT: /(.|\\n)+/\nANY: /(.|\\n)*/\n"
    )


def _specials(ids: Sequence[int]) -> tuple[str, str]:
    """The item of free text (``TEXT``, or ``TEXT | special``) and the ``special`` rule: ``ids`` as runs of
    token ids, ``<[a-b]> | <[c]>``."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    if not runs:
        return "TEXT", ""
    alts = " | ".join(f"<[{a}-{b}]>" if b > a else f"<[{a}]>" for a, b in runs)
    return "(TEXT | special)", f"special: {alts}\n"


def mask(row: torch.Tensor, matcher: Any) -> torch.Tensor:
    """``row`` (one position's logits) with every token the grammar refuses at -inf."""
    import llguidance.torch as lt

    bits = lt.allocate_token_bitmask(1, row.shape[-1])
    lt.fill_next_token_bitmask(matcher, bits, 0)
    out = row.clone().unsqueeze(0)
    lt.apply_token_bitmask_inplace(out, bits)
    return out[0]


def advance(matcher: Any, token: int) -> bool:
    """Feed ``token`` to the grammar; True when the grammar is complete (nothing more may follow)."""
    matcher.consume_token(token)
    return bool(matcher.is_stopped() or matcher.is_error())
