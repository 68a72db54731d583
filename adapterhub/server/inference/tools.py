"""Tool calls in the chat template's own format, as vLLM's tool parsers read them: the prompt (the
template's rendering of ``tools``), the grammar of the answer, and the answer read back as OpenAI's
``tool_calls``, whole or streamed.

Formats (from the chat template):

- **tagged** (Hermes, Qwen 2.5/3, SmolLM3, and any template that names no other): calls are
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after optional text (a JSON list of
  calls inside one tag is read too). A template that ignores ``tools`` (SmolLM2's) gets them described in
  a system message in this format, as Qwen's template does; earlier calls and tool results in the history
  are written the same way.
- **bare** (Llama 3.x JSON): the whole answer is ``{"name": ..., "parameters": {...}}`` (``;``-separated
  for several); an answer that starts otherwise is text.
- **mistral** / **mistral_args** (``[TOOL_CALLS][{...}]`` / ``[TOOL_CALLS]name[ARGS]{...}``), **granite**
  (Granite 3.x, ``<|tool_call|>[{...}]``), **deepseek** (DeepSeek V3/R1,
  ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json...``): the formats whose
  calls follow a marker token, read by `toolformats` (`reader` picks the reader of a mode), each held by
  its own lazy grammar, the markers kept in the answer's text (``ToolPlan.keep``).
- **pythonic** (Llama 3.2's pythonic template, Llama 4: ``[get_weather(city="Paris")]`` as the whole
  answer), read by `toolpython`, unconstrained under ``auto`` (no grammar holds Python literals).

``tool_choice``: ``auto`` (the default with tools) lets the model decide; with llguidance the answer is
held to a grammar that leaves text free and holds a call, once begun, to the tools' schemas: lazy, from
the trigger ``<tool_call>`` on (`grammar.lazy_tool_grammar`; a marker format's from its marker on), or,
bare, an answer that opens with ``{`` (`grammar.bare_tool_grammar`). ``required`` / a named function force one bare
``{"name", "arguments"}`` object (`grammar.tool_schema`). ``none``: text, nothing parsed.

`Calls` (a marker format's reader likewise) reads one choice's text as it comes and gives OpenAI's stream deltas: content before the first
call, then per call ``{index, id, type, function: {name, arguments: ""}}`` once its name is known and the
arguments as they are written (the model's own JSON text, so the streamed pieces join to exactly what the
whole answer carries). Text after the first call is dropped, as vLLM's parsers drop it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...runtime.chat import (
    CLOSE,
    OPEN,
    chat_prompt,
    described,
    history,
    short_id,
    template_format,
    tool_format,
)
from .calljson import new_id, partial, skip, value_end
from .calljson import scan as scan_call
from .grammar import bare_tool_grammar, call_schema, lazy_tool_grammar, response_schema, tool_schema
from .refusal import Refusal
from .toolformats import (
    DeepSeekCalls,
    DeepSeekV31Calls,
    GraniteCalls,
    MarkedCalls,
    MistralArgsCalls,
    MistralCalls,
)
from .toolpython import PythonicCalls

__all__ = [
    "CLOSE",
    "FORMATS",
    "OPEN",
    "Calls",
    "ToolPlan",
    "chat_prompt",
    "described",
    "flat_message",
    "history",
    "plan",
    "reader",
    "short_id",
    "split",
    "template_format",
    "tool_format",
]

_WS = " \t\r\n"


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's answer: its grammar (None: free) and how its text is read (``mode`` None: plain
    text; ``forced``: one bare call object; ``tagged`` / ``bare`` / a `toolformats.FORMATS` name: the model
    decides)."""

    grammar: str | None = None
    mode: str | None = None
    #: the marker tokens the answer's text keeps (`toolformats`: special tokens decoding would drop)
    keep: tuple[int, ...] = ()


FORMATS: dict[str, type[MarkedCalls]] = {
    "mistral": MistralCalls,
    "mistral_args": MistralArgsCalls,
    "granite": GraniteCalls,
    "deepseek": DeepSeekCalls,
    "deepseek_v31": DeepSeekV31Calls,
    "pythonic": PythonicCalls,
}


def flat_message(m: Any) -> dict[str, Any]:
    """A request's message as chat templates read it (``developer`` is ``system`` to them; tool calls'
    arguments as objects)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                args = c.function.arguments
            calls.append(
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}}
            )
        out["tool_calls"] = calls
    return out


def plan(svc: Any, req: Any) -> ToolPlan | Refusal:
    """The grammar and the reading of a chat request's answer: a forced tool call, a call the model may
    make (``auto``), its ``response_format``, or free text."""
    if req.tools:
        schema, why = tool_schema(req.tools, req.tool_choice)
        if why is not None:
            return why
        if schema is not None:
            grammar = svc.grammars.compile(schema, "tools")
            return grammar if isinstance(grammar, Refusal) else ToolPlan(grammar, "forced")
    wanted = response_schema(req.response_format) if req.response_format is not None else None
    if isinstance(wanted, Refusal):
        return wanted
    if wanted is not None:
        grammar = svc.grammars.compile(wanted, "response_format")
        return grammar if isinstance(grammar, Refusal) else ToolPlan(grammar)
    if not req.tools or req.tool_choice == "none":
        return ToolPlan()
    fmt = tool_format(svc.tokenizer)
    mode = fmt.kind
    added = svc.tokenizer.get_added_vocab() if hasattr(svc.tokenizer, "get_added_vocab") else {}
    marked = FORMATS.get(mode)
    ids = {m: added[m] for m in marked.markers if m in added} if marked else {}
    if not svc.grammars.available():
        return ToolPlan(None, mode, tuple(ids.values()))  # read, not held to a grammar
    call = call_schema(req.tools, None, "parameters" if mode == "bare" else "arguments")
    if isinstance(call, Refusal):
        return call
    parallel = req.parallel_tool_calls is not False
    if marked:
        lark = marked.grammar(
            call, parallel, ids, [i for i in svc.grammars.specials() if i not in ids.values()]
        )
        if lark is None:
            return ToolPlan(None, mode, tuple(ids.values()))  # a format no grammar holds (pythonic)
        grammar = svc.grammars.compile(call, "tools", lark=lark)
        return grammar if isinstance(grammar, Refusal) else ToolPlan(grammar, mode, tuple(ids.values()))
    tags = (
        {OPEN: added.get(OPEN), CLOSE: added.get(CLOSE)} if fmt.tagged else {"": added.get("<|python_tag|>")}
    )
    specials = [i for i in svc.grammars.specials() if i not in tags.values()]  # free text may hold them
    if fmt.tagged:
        lark = lazy_tool_grammar(call, parallel, tags[OPEN], tags[CLOSE], specials)
    else:
        lark = bare_tool_grammar(call, parallel, tags[""], specials)
    grammar = svc.grammars.compile(call, "tools", lark=lark)
    return grammar if isinstance(grammar, Refusal) else ToolPlan(grammar, mode)


class Calls:
    """One choice's answer read as it is written (``mode`` as `ToolPlan`'s): `feed` a piece of text, get
    the stream deltas it completes; `close` at the end. ``calls``: the calls read whole (OpenAI's
    ``tool_calls`` entries, arguments as the model's JSON text)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.buf = ""
        self.state = "call" if mode == "forced" else ("start" if mode == "bare" else "text")
        self.calls: list[dict[str, Any]] = []
        self.content: list[str] = []
        self.broken = False  # a call began and was not valid
        self._id = ""
        self._sent_head = False
        self._sent_args = 0

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.buf += piece
        return self._step(False)

    def close(self) -> list[dict[str, Any]]:
        return self._step(True)

    @property
    def started(self) -> bool:
        """Whether a call has begun (its text is no content)."""
        return bool(self.calls) or self.state not in ("text", "start", "plain")

    def _text(self, s: str) -> list[dict[str, Any]]:
        if not s or self.started:
            return []
        self.content.append(s)
        return [{"content": s}]

    def _step(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if self.state == "plain":
                out += self._text(self.buf)
                self.buf = ""
                return out
            if self.state == "start":  # bare: a call only if the answer opens with "{"
                rest = self.buf.lstrip(_WS)
                if not rest and not final:
                    return out
                self.state = "call" if rest.startswith("{") else "plain"
                if self.state == "call":
                    self.buf = rest
                continue
            if self.state == "text":
                at = self.buf.find(OPEN)
                if at >= 0:
                    out += self._text(self.buf[:at])
                    self.buf, self.state = self.buf[at + len(OPEN) :], "call"
                    continue
                hold = 0 if final else partial(self.buf, OPEN)
                out += self._text(self.buf[: len(self.buf) - hold])
                self.buf = self.buf[len(self.buf) - hold :]
                return out
            if self.state == "after":  # past a call: its closing tag, or the next call
                rest = self.buf.lstrip(_WS)
                if self.mode == "forced" or (self.mode == "tagged" and rest.startswith(CLOSE)):
                    self.buf = rest[len(CLOSE) :] if self.mode == "tagged" else ""
                    self.state = "text" if self.mode == "tagged" else "done"
                    continue
                if self.mode == "bare" and rest.startswith(";"):
                    self.buf, self.state = rest[1:], "call"
                    continue
                if not final and (CLOSE.startswith(rest) if self.mode == "tagged" else not rest):
                    return out
                self.buf, self.state = (rest, "text") if self.mode == "tagged" else ("", "done")
                continue
            if self.state == "done":
                self.buf = ""
                return out
            more = self._call(final)  # state "call"
            if more is None:
                return out
            out += more
            if self.state != "after":
                return out

    def _call(self, final: bool) -> list[dict[str, Any]] | None:
        s = self.buf
        if self.mode == "tagged" and s.lstrip(_WS).startswith("["):  # a list of calls in one tag
            return self._list(final)
        scan = scan_call(s, final)
        if scan.error:
            return self._broken(s)
        out: list[dict[str, Any]] = []
        if scan.name is not None and scan.args is not None:
            if not self._sent_head:
                self._id, self._sent_head, self._sent_args = new_id(), True, 0
                out.append(
                    self._delta(
                        {"id": self._id, "type": "function", "function": {"name": scan.name, "arguments": ""}}
                    )
                )
            start, known = scan.args
            if known - start > self._sent_args:
                piece = s[start + self._sent_args : known]
                self._sent_args = known - start
                out.append(self._delta({"function": {"arguments": piece}}))
        if scan.end is None:
            return out
        args = s[scan.args[0] : scan.args[1]] if scan.args is not None else "{}"
        try:
            json.loads(args)
        except ValueError:
            return out + self._broken(s)
        if not self._sent_head:  # no arguments: the call in one delta
            self._id = new_id()
            out.append(
                self._delta(
                    {"id": self._id, "type": "function", "function": {"name": scan.name, "arguments": args}}
                )
            )
        self.calls.append(
            {"id": self._id, "type": "function", "function": {"name": scan.name, "arguments": args}}
        )
        self._sent_head, self.buf, self.state = False, s[scan.end :], "after"
        return out

    def _list(self, final: bool) -> list[dict[str, Any]] | None:
        s = self.buf
        at = skip(s, 0)
        end, _ = value_end(s, at)
        if end is None:
            return self._broken(s) if final else None
        try:
            items = json.loads(s[at:end])
        except ValueError:
            return self._broken(s)
        out = []
        for item in items:
            name = item.get("name") if isinstance(item, dict) else None
            args = item.get("arguments", item.get("parameters", {})) if isinstance(item, dict) else None
            if not isinstance(name, str):
                return self._broken(s)
            call = {
                "id": new_id(),
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
            self.calls.append(call)
            out.append({"tool_calls": [{"index": len(self.calls) - 1, **call}]})
        self.buf, self.state = s[end:], "after"
        return out

    def _broken(self, s: str) -> list[dict[str, Any]]:
        """A call that is no valid call: its text is content (when nothing of it was sent) and nothing
        more is read as calls."""
        self.broken = True
        raw = s if self.mode != "tagged" else OPEN + s
        was = self.started and not self.calls and not self._sent_head
        self.state, self.buf = "plain", ""
        if was:
            self.content.append(raw)
            return [{"content": raw}]
        return []

    def _delta(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"tool_calls": [{"index": len(self.calls), **call}]}


def reader(mode: str) -> Calls | MarkedCalls:
    """The reader of one choice's answer in ``mode`` (`ToolPlan`'s): `Calls`, or the marker format's."""
    return FORMATS[mode](mode) if mode in FORMATS else Calls(mode)


def split(text: str, mode: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer as OpenAI's message ``content`` and ``tool_calls`` (no calls: the text, as written)."""
    r = reader(mode)
    r.feed(text)
    r.close()
    if not r.calls:
        return text, []
    content = "".join(r.content)
    return (content if content.strip() else None), r.calls
