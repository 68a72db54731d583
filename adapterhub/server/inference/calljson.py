"""Tool calls' JSON read as it is written (`tools` and `toolformats` read calls with it): where a value
ends, how far a call object is known, and call ids."""

from __future__ import annotations

import json
import random
import string
import uuid
from dataclasses import dataclass

__all__ = ["Scan", "closing", "new_id", "partial", "scan", "skip", "value_end"]

_WS = " \t\r\n"


# --- JSON read as it is written -------------------------------------------------------------------


def new_id(short: bool = False) -> str:
    """A call id: OpenAI's ``call_...``, or Mistral's 9 letters or digits (``short``)."""
    if short:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))
    return "call_" + uuid.uuid4().hex[:24]


def skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def partial(s: str, tag: str) -> int:
    """The length of the longest end of ``s`` that begins ``tag``."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if tag.startswith(s[-n:]):
            return n
    return 0


def value_end(s: str, i: int) -> tuple[int | None, int]:
    """Where the JSON value at ``s[i]`` ends (None: not yet written whole), and how far ``s[i:]`` is known
    to be part of it (an object or list grows as it is written; a scalar is only known whole)."""
    if i >= len(s):
        return None, i
    if s[i] not in "{[":
        try:
            _, end = json.JSONDecoder().raw_decode(s, i)
        except ValueError:
            return None, i
        return (end, end) if s[i] == '"' or end < len(s) else (None, i)
    closed = closing(s, i)
    return (closed, closed) if closed is not None else (None, len(s))


def closing(s: str, i: int, quotes: str = '"', opens: str = "{[", closes: str = "}]") -> int | None:
    """Just past the bracket that closes the one at ``s[i]`` (None: not yet written), strings in
    ``quotes`` skipped (backslash escapes heeded)."""
    depth, quote, esc = 0, "", False
    for j in range(i, len(s)):
        ch = s[j]
        if quote:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                quote = ""
        elif ch in quotes:
            quote = ch
        elif ch in opens:
            depth += 1
        elif ch in closes:
            depth -= 1
            if depth == 0:
                return j + 1
    return None


@dataclass
class Scan:
    """How far one call has been written: its name (once whole), its arguments' span (start, known end),
    and where the call ends (None: not yet); ``error``: it is no valid call."""

    name: str | None = None
    args: tuple[int, int] | None = None
    args_done: bool = False
    end: int | None = None
    error: bool = False
    #: the arguments' JSON where it is not ``s[args]`` (a format that writes them otherwise)
    text: str | None = None


def scan(s: str, final: bool) -> Scan:
    """Read the call object ``{"name": ..., "arguments": ...}`` at the start of ``s`` (after blanks) as far
    as it is written (``parameters`` is read as ``arguments``)."""
    out = Scan()
    dec = json.JSONDecoder()
    i = skip(s, 0)
    if i == len(s):
        out.error = final
        return out
    if s[i] != "{":
        out.error = True
        return out
    i += 1
    while True:
        i = skip(s, i)
        if i == len(s):
            break
        if s[i] == "}" and (out.name is not None or out.args is not None):
            out.end = i + 1
            out.error = not isinstance(out.name, str)
            return out
        if s[i] != '"':
            out.error = True
            return out
        try:
            key, i = dec.raw_decode(s, i)
        except ValueError:
            break
        i = skip(s, i)
        if i == len(s):
            break
        if s[i] != ":":
            out.error = True
            return out
        i = skip(s, i + 1)
        end, known = value_end(s, i)
        if key in ("arguments", "parameters") and out.args is None:
            out.args = (i, known)
            out.args_done = end is not None
        if end is None:
            break
        if key == "name":
            out.name = json.loads(s[i:end])
            if not isinstance(out.name, str):
                out.error = True
                return out
        i = skip(s, end)
        if i == len(s):
            break
        if s[i] == ",":
            i += 1
        elif s[i] != "}":
            out.error = True
            return out
    out.error = final
    return out
