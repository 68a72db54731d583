"""The pythonic tool-call format (Llama 3.2's pythonic template, Llama 4): the whole answer is a Python list
of calls with keyword arguments, ``[get_weather(city="Paris"), wait()]`` (after blanks, and Llama 4's
``<|python_start|>`` where it writes one), as vLLM's ``pythonic`` parser reads it; an answer that opens
otherwise is text. Each call's arguments are Python literals (read with `ast.literal_eval`, which
evaluates nothing but literals), given as the JSON object OpenAI's ``arguments`` is: streamed, a call's
name goes out once written, its arguments in one piece once the call is closed.

Not held by a grammar: the arguments are Python literals, which llguidance's JSON schemas do not
describe, so ``tool_choice: auto`` reads this format unconstrained (``required`` / a named function
still force one JSON call object, as for every format)."""

from __future__ import annotations

import ast
import json
from typing import Any

from .calljson import Scan, closing, skip
from .toolformats import MarkedCalls

__all__ = ["PythonicCalls"]

PY_START, PY_END = "<|python_start|>", "<|python_end|>"
_NAME_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME = _NAME_START | set("0123456789.")


def _literal(node: ast.expr) -> Any:
    return ast.literal_eval(node)


class PythonicCalls(MarkedCalls):
    """``[name(key=literal, ...), ...]`` as the whole answer."""

    trigger = "["
    markers = (PY_START, PY_END)

    def _step(self, final: bool) -> list[dict[str, Any]]:
        if self.state == "text":  # a call only if the answer opens with "[" (after blanks, <|python_start|>)
            at = skip(self.buf, 0)
            if self.buf.startswith(PY_START, at):
                at = skip(self.buf, at + len(PY_START))
            rest = self.buf[at:]
            if not final and (not rest or (PY_START.startswith(rest) and at == skip(self.buf, 0))):
                return []
            if not rest.startswith("["):
                self.state = "plain"
                return super()._step(final)
            self._seen, self.buf, self.state = self.buf[: at + 1], rest[1:], "call"
        return super()._step(final)

    def _call(self, s: str, final: bool) -> Scan:
        out = Scan()
        i = skip(s, 0)
        j = i
        while j < len(s) and s[j] in _NAME:
            j += 1
        if j == len(s) or j == i or s[i] not in _NAME_START or s[j] != "(":
            out.error = final or j < len(s) or (j > i and s[i] not in _NAME_START)
            return out
        out.name = s[i:j]
        end = closing(s, j, quotes="'\"", opens="([{", closes=")]}")
        if end is None:
            out.error = final
            return out
        try:
            node = ast.parse(s[i:end], mode="eval").body
            if not isinstance(node, ast.Call) or node.args:
                raise ValueError("not a call with keyword arguments")
            args = {k.arg: _literal(k.value) for k in node.keywords if k.arg is not None}
            text = json.dumps(args, ensure_ascii=False)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            out.error = True
            return out
        out.text, out.end = text, end
        return out

    def _next(self, s: str, final: bool) -> tuple[str, int]:
        i = skip(s, 0)
        if i == len(s):
            return ("wait", 0) if not final else ("done", i)
        return {",": ("call", i + 1), "]": ("done", i + 1)}.get(s[i], ("error", 0))

    @classmethod
    def grammar(
        cls, call: dict[str, Any], parallel: bool, ids: dict[str, int], specials: list[int]
    ) -> str | None:
        return None  # Python literals: not held (see the module's doc)
