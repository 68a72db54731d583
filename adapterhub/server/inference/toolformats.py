"""The tool-call formats that open with a marker token, read as vLLM's parsers read them (`tools` holds
the tagged and bare formats and dispatches here).

Formats (found in the chat template, `tools.template_format`; `toolpython` holds the pythonic one):

- **mistral** (Mistral 7B v0.3, Nemo, Small 3/3.1, Large 2): ``[TOOL_CALLS]`` then a JSON list
  ``[{"name": ..., "arguments": {...}}, ...]``.
- **mistral_args** (templates that write ``[ARGS]``: Mistral Small 3.2, Magistral, Devstral):
  ``[TOOL_CALLS]name[ARGS]{...}``, the marker again before each further call. Either Mistral form is
  read whichever the template names; ids are 9 letters or digits, as Mistral's templates require (ids
  of the history that are not are mapped to such ids, the same for a call and its result).
- **granite** (Granite 3.x): ``<|tool_call|>`` then a JSON list as Mistral's.
- **deepseek** (DeepSeek V3 / R1): ``<｜tool▁calls▁begin｜>`` then per call
  ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>``
  (``\\n``-separated), then ``<｜tool▁calls▁end｜>``. V3's own template ignores ``tools``: they are
  described in a system message in this format, as vLLM's DeepSeek template does.
- **deepseek_v31** (a DeepSeek template without V3's json fence): V3.1's
  ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``. Either DeepSeek form is read whichever
  the template names.

Earlier calls and results in the history are written by the template itself (`runtime.chat.history`). Where
it shows no calls (Granite's writes only a message's content; DeepSeek V3's shows only a call message
whose content is None, a key transformers 5 drops), the calls are written into the content as the
model writes them.

In every format text may come before the marker (it is the message's ``content``); text after the
calls is dropped. A call that is no valid call (a broken JSON, a name that is no name) makes the whole
answer text. With llguidance, ``tool_choice: auto`` is held by a lazy grammar (`grammar`): free text
until the marker, then calls of the request's tools only, each argument object valid for its tool's
schema. The markers are special tokens in these models' vocabularies: the engine keeps them in the
answer's text (`ToolFormat.markers`, ``Job.keep``), as vLLM turns off ``skip_special_tokens`` for them.
"""

from __future__ import annotations

import json
import string
from typing import Any

from ...runtime.chat import ARGS, CALL_ID, DS_BEGIN, DS_CALL, DS_CALL_END, DS_END, DS_SEP, GRANITE, TC
from .calljson import Scan, new_id, partial, scan, skip, value_end
from .grammar import COMPACT, trigger_grammar

__all__ = [
    "DeepSeekCalls",
    "DeepSeekV31Calls",
    "GraniteCalls",
    "MarkedCalls",
    "MistralArgsCalls",
    "MistralCalls",
]

_WS = " \t\r\n"
_NAME = set(string.ascii_letters + string.digits + "_-.")


def _object(s: str, i: int, out: Scan, final: bool) -> int | None:
    """Read the arguments object at ``s[i]`` (after blanks) into ``out``; where it ends (None: not yet, or
    ``out.error``)."""
    i = skip(s, i)
    if i == len(s):
        out.error = final
        return None
    if s[i] != "{":
        out.error = True
        return None
    end, known = value_end(s, i)
    out.args = (i, known)
    out.error = final and end is None
    return end


def _expect(s: str, i: int, tag: str, out: Scan, final: bool) -> int | None:
    """Past ``tag`` at ``s[i]`` (after blanks); None while it may yet come, or ``out.error``."""
    i = skip(s, i)
    if s.startswith(tag, i):
        return i + len(tag)
    out.error = final or not tag.startswith(s[i:])
    return None


# --- the readers --------------------------------------------------------------------------------------


class MarkedCalls:
    """One choice's answer read as it is written, in a format whose calls follow a marker (`tools.Calls`'
    interface: `feed` text, get the stream deltas it completes; `close`; ``calls``, ``content``)."""

    trigger = ""
    #: the marker tokens the answer's text must keep
    markers: tuple[str, ...] = ()
    #: ids as Mistral's templates want them
    short_ids = False

    def __init__(self, mode: str = "") -> None:
        self.mode = mode
        self.buf = ""
        self.state = "text"
        self.calls: list[dict[str, Any]] = []
        self.content: list[str] = []
        self.broken = False
        self._seen = ""  # the text read since the marker
        self._id = ""
        self._head = False
        self._sent = 0

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.buf += piece
        return self._step(False)

    def close(self) -> list[dict[str, Any]]:
        return self._step(True)

    # a format reads: what opens the calls after the marker, one call, and what follows a call
    def _open(self, s: str, final: bool) -> tuple[str, int]:
        """``("call", n)``: a call begins after ``s[:n]``; ``("wait", 0)``; ``("error", 0)``."""
        raise NotImplementedError

    def _call(self, s: str, final: bool) -> Scan:
        raise NotImplementedError

    def _next(self, s: str, final: bool) -> tuple[str, int]:
        """After a call: ``("call", n)`` another, ``("done", n)``, or ``("wait", 0)``."""
        raise NotImplementedError

    def _text(self, s: str) -> list[dict[str, Any]]:
        if not s or self.calls or self._head or self.state not in ("text", "plain"):
            return []
        self.content.append(s)
        return [{"content": s}]

    def _step(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if self.state == "text":
                at = self.buf.find(self.trigger)
                if at >= 0:
                    out += self._text(self.buf[:at])
                    self._seen, self.buf = self.trigger, self.buf[at + len(self.trigger) :]
                    self.state = "open"
                    continue
                hold = 0 if final else partial(self.buf, self.trigger)
                out += self._text(self.buf[: len(self.buf) - hold])
                self.buf = self.buf[len(self.buf) - hold :]
                return out
            if self.state in ("done", "plain"):  # past the calls (dropped), or no call (text)
                out += self._text(self.buf) if self.state == "plain" else []
                self.buf = ""
                return out
            if self.state in ("open", "next"):
                what, n = (self._open if self.state == "open" else self._next)(self.buf, final)
                if what == "wait" and not final:
                    return out
                if what in ("error", "wait"):
                    return out + self._broken()
                self._seen += self.buf[:n]
                self.buf, self.state = self.buf[n:], ("call" if what == "call" else "done")
                continue
            got = self._call(self.buf, final)
            if got.error:
                return out + self._broken()
            out += self._pieces(got)
            if got.end is None:
                if final:
                    return out + self._broken()
                return out
            s = self.buf
            args = got.text if got.text is not None else s[got.args[0] : got.args[1]] if got.args else "{}"
            try:
                json.loads(args)
            except ValueError:
                return out + self._broken()
            if self._sent == 0:  # nothing of the arguments went out yet
                out.append(self._delta({"function": {"arguments": args}}))
            self.calls.append(
                {"id": self._id, "type": "function", "function": {"name": got.name, "arguments": args}}
            )
            self._seen += s[: got.end]
            self._head, self._sent, self.buf, self.state = False, 0, s[got.end :], "next"

    def _pieces(self, got: Scan) -> list[dict[str, Any]]:
        """The deltas of what more is known of the current call: its head once the name is whole, then the
        arguments as written."""
        out: list[dict[str, Any]] = []
        if got.name is None:
            return out
        if not self._head:
            self._id, self._head, self._sent = new_id(self.short_ids), True, 0
            head = {"id": self._id, "type": "function", "function": {"name": got.name, "arguments": ""}}
            out.append(self._delta(head))
        if got.args is not None:
            start, known = got.args
            if known - start > self._sent:
                piece = self.buf[start + self._sent : known]
                self._sent = known - start
                out.append(self._delta({"function": {"arguments": piece}}))
        return out

    def _broken(self) -> list[dict[str, Any]]:
        """No valid call: the text from the marker on is content when nothing of the calls went out, and
        nothing more is read as calls."""
        self.broken = True
        raw, was = self._seen + self.buf, not self.calls and not self._head
        self.state, self.buf = "plain", ""
        if was:
            self.content.append(raw)
            return [{"content": raw}]
        return []

    def _delta(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"tool_calls": [{"index": len(self.calls), **call}]}

    # what a format offers the grammar (how it writes calls: `runtime.chat.written`)
    @classmethod
    def grammar(
        cls, call: dict[str, Any], parallel: bool, ids: dict[str, int], specials: list[int]
    ) -> str | None:
        """The lazy Lark grammar of an ``auto`` answer (None: not held): ``call`` is `grammar.call_schema`'s
        schema of one call; ``ids``: the markers the vocabulary has as added tokens."""
        raise NotImplementedError


def _tools_of(call: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments schema) of each tool of `grammar.call_schema`'s schema."""
    return [
        (one["properties"]["name"]["const"], one["properties"]["arguments"])
        for one in call.get("anyOf", [call])
    ]


def _lit(marker: str, ids: dict[str, int]) -> str:
    return f"<[{ids[marker]}]>" if marker in ids else json.dumps(marker, ensure_ascii=False)


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({"x-guidance": COMPACT, **schema}, ensure_ascii=False)


class _ListCalls(MarkedCalls):
    """The marker, then a JSON list of ``{"name", "arguments"}`` objects."""

    def _open(self, s: str, final: bool) -> tuple[str, int]:
        i = skip(s, 0)
        if i == len(s):
            return "wait", 0
        return ("call", i + 1) if s[i] == "[" else ("error", 0)

    def _call(self, s: str, final: bool) -> Scan:
        return scan(s, final)

    def _next(self, s: str, final: bool) -> tuple[str, int]:
        i = skip(s, 0)
        if i == len(s):
            return "wait", 0
        return {",": ("call", i + 1), "]": ("done", i + 1)}.get(s[i], ("error", 0))

    @classmethod
    def grammar(cls, call: dict[str, Any], parallel: bool, ids: dict[str, int], specials: list[int]) -> str:
        listed = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return trigger_grammar(
            cls.trigger, ids.get(cls.trigger), '" "? calls', f"calls: {_json(listed)}\n", specials
        )


class MistralCalls(_ListCalls):
    """Mistral's ``[TOOL_CALLS]``: a JSON list (older templates) or ``name[ARGS]{...}`` per call."""

    trigger = TC
    markers = (TC, ARGS, CALL_ID)
    short_ids = True
    named = False  # the grammar's form: ``name[ARGS]{...}`` (else the list)

    def _open(self, s: str, final: bool) -> tuple[str, int]:
        i = skip(s, 0)
        if i < len(s) and s[i] != "[":
            self.named = True
            return "call", i
        return super()._open(s, final)

    def _call(self, s: str, final: bool) -> Scan:
        if not self.named:
            return scan(s, final)
        out = Scan()
        i = 0
        while i < len(s) and s[i] in _NAME:
            i += 1
        j = skip(s, i)
        rest = s[j:]
        if not rest or (rest[0] == "[" and not rest.startswith((ARGS, CALL_ID))):
            maybe = ARGS.startswith(rest) or CALL_ID.startswith(rest)
            out.error = final or not maybe or (i == 0 and bool(rest))
            return out
        if i == 0 or rest[0] not in "[{":
            out.error = True
            return out
        out.name = s[:i]
        if rest.startswith(CALL_ID):  # an id written before the arguments (as the history has them)
            at = s.find(ARGS, j)
            if at < 0:
                out.error = final
                return out
            j = at
        if s.startswith(ARGS, j):
            j += len(ARGS)
        out.end = _object(s, j, out, final)
        return out

    def _next(self, s: str, final: bool) -> tuple[str, int]:
        if not self.named:
            return super()._next(s, final)
        i = skip(s, 0)
        if s.startswith(TC, i):
            return "call", i + len(TC)
        return ("wait", 0) if TC.startswith(s[i:]) and not final else ("done", i)


class MistralArgsCalls(MistralCalls):
    """Mistral's newer templates (``[ARGS]``): calls written ``[TOOL_CALLS]name[ARGS]{...}``."""

    @classmethod
    def grammar(cls, call: dict[str, Any], parallel: bool, ids: dict[str, int], specials: list[int]) -> str:
        tools = _tools_of(call)
        alts = " | ".join(f"fn_{k}" for k in range(len(tools)))
        rules = "".join(
            f"fn_{k}: {json.dumps(n, ensure_ascii=False)} {_lit(ARGS, ids)} args_{k}\nargs_{k}: {_json(p)}\n"
            for k, (n, p) in enumerate(tools)
        )
        more = f" ({_lit(TC, ids)} call)*" if parallel else ""
        return trigger_grammar(TC, ids.get(TC), f"call{more}", f"call: {alts}\n{rules}", specials)


class GraniteCalls(_ListCalls):
    """Granite 3.x: ``<|tool_call|>`` then a JSON list of calls."""

    trigger = GRANITE
    markers = (GRANITE,)


class DeepSeekCalls(MarkedCalls):
    """DeepSeek V3 / R1 (and V3.1's shorter calls)."""

    trigger = DS_BEGIN
    markers = (DS_BEGIN, DS_END, DS_CALL, DS_SEP, DS_CALL_END)

    def _open(self, s: str, final: bool) -> tuple[str, int]:
        i = skip(s, 0)
        if s.startswith(DS_CALL, i):
            return "call", i + len(DS_CALL)
        return ("wait", 0) if DS_CALL.startswith(s[i:]) else ("error", 0)

    def _call(self, s: str, final: bool) -> Scan:
        out = Scan()
        sep = s.find(DS_SEP)
        if sep < 0:
            out.error = final or len(s) > 64 or "\n" in s
            return out
        head, i = s[:sep].strip(), sep + len(DS_SEP)
        fenced = s[skip(s, i) : skip(s, i) + 1] != "{"
        if fenced:  # V3: "function", then the name on its own line and the arguments in a json fence
            eol = s.find("\n", i)
            if eol < 0:
                out.error = final or len(s) - i > 256
                return out
            head = s[i:eol].strip()
        if not head or not set(head) <= _NAME:
            out.error = True
            return out
        out.name = head
        if fenced:
            fence = _expect(s, s.find("\n", i) + 1, "```json", out, final)
            if fence is None:
                return out
            i = fence
        end = _object(s, i, out, final)
        if end is not None and fenced:
            end = _expect(s, end, "```", out, final)
        if end is not None:
            out.end = _expect(s, end, DS_CALL_END, out, final)
        return out

    def _next(self, s: str, final: bool) -> tuple[str, int]:
        i = skip(s, 0)
        for tag, what in ((DS_CALL, "call"), (DS_END, "done")):
            if s.startswith(tag, i):
                return what, i + len(tag)
        if not final and (DS_CALL.startswith(s[i:]) or DS_END.startswith(s[i:])):
            return "wait", 0
        return "done", i

    @classmethod
    def grammar(cls, call: dict[str, Any], parallel: bool, ids: dict[str, int], specials: list[int]) -> str:
        tools = _tools_of(call)
        alts = " | ".join(f"fn_{k}" for k in range(len(tools)))
        rules = "".join(
            f"fn_{k}: {json.dumps(n + chr(10) + '```json' + chr(10), ensure_ascii=False)} args_{k}\n"
            f"args_{k}: {_json(p)}\n"
            for k, (n, p) in enumerate(tools)
        )
        one = (
            f'{_lit(DS_CALL, ids)} "function" {_lit(DS_SEP, ids)} ({alts}) "\\n```" {_lit(DS_CALL_END, ids)}'
        )
        more = ' ("\\n" call)*' if parallel else ""
        return trigger_grammar(
            DS_BEGIN, ids.get(DS_BEGIN), f"call{more} {_lit(DS_END, ids)}", f"call: {one}\n{rules}", specials
        )


class DeepSeekV31Calls(DeepSeekCalls):
    """DeepSeek V3.1: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`` per call (V3's
    calls are read too)."""

    @classmethod
    def grammar(cls, call: dict[str, Any], parallel: bool, ids: dict[str, int], specials: list[int]) -> str:
        tools = _tools_of(call)
        alts = " | ".join(f"fn_{k}" for k in range(len(tools)))
        rules = "".join(
            f"fn_{k}: {json.dumps(n, ensure_ascii=False)} {_lit(DS_SEP, ids)} args_{k}\nargs_{k}: {_json(p)}\n"
            for k, (n, p) in enumerate(tools)
        )
        more = " call*" if parallel else ""
        return trigger_grammar(
            DS_BEGIN,
            ids.get(DS_BEGIN),
            f"call{more} {_lit(DS_END, ids)}",
            f"call: {_lit(DS_CALL, ids)} ({alts}) {_lit(DS_CALL_END, ids)}\n{rules}",
            specials,
        )
