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

``tool_choice``: ``auto`` (the default with tools) lets the model decide; with llguidance the answer is
held to a grammar that leaves text free and holds a call, once begun, to the tools' schemas: lazy, from
the trigger ``<tool_call>`` on (`grammar.lazy_tool_grammar`), or, bare, an answer that opens with ``{``
(`grammar.bare_tool_grammar`). ``required`` / a named function force one bare
``{"name", "arguments"}`` object (`grammar.tool_schema`). ``none``: text, nothing parsed.

`Calls` reads one choice's text as it comes and gives OpenAI's stream deltas: content before the first
call, then per call ``{index, id, type, function: {name, arguments: ""}}`` once its name is known and the
arguments as they are written (the model's own JSON text, so the streamed pieces join to exactly what the
whole answer carries). Text after the first call is dropped, as vLLM's parsers drop it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from .grammar import bare_tool_grammar, call_schema, lazy_tool_grammar, response_schema, tool_schema
from .refusal import Refusal

__all__ = [
    "CLOSE",
    "OPEN",
    "Calls",
    "ToolPlan",
    "chat_prompt",
    "described",
    "flat_message",
    "plan",
    "split",
    "tool_format",
]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_WS = " \t\r\n"

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolFormat:
    """How the model writes calls: ``tagged`` (``<tool_call>``) or bare JSON; ``inject``: the template
    ignores ``tools``, so they are described in a system message."""

    tagged: bool = True
    inject: bool = False


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's answer: its grammar (None: free) and how its text is read (``mode`` None: plain
    text; ``forced``: one bare call object; ``tagged`` / ``bare``: the model decides)."""

    grammar: str | None = None
    mode: str | None = None


def _template(tok: Any) -> str:
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        return "\n".join(str(v) for v in t.values())
    return t or ""


_PROBE = [{"type": "function", "function": {"name": "probe_fn_x7", "parameters": {"type": "object"}}}]


def tool_format(tok: Any) -> ToolFormat:
    """The chat template's tool format (see the module's doc)."""
    tpl = _template(tok)
    if not tpl:
        return ToolFormat(inject=True)
    tagged = OPEN in tpl or not ("<|python_tag|>" in tpl or '"parameters": dictionary' in tpl)
    try:
        shown = tok.apply_chat_template(
            [{"role": "user", "content": "x"}], tools=_PROBE, add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that breaks on tools: described in a system message instead
        return ToolFormat(tagged=True, inject=True)
    return ToolFormat(tagged=tagged, inject="probe_fn_x7" not in str(shown))


def chat_prompt(tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
    """The prompt's token ids: the chat template applied to ``messages`` with ``tools`` in its own
    format (raises what the template raises)."""
    from ...runtime.generate import chat_ids

    if not tools:
        return chat_ids(tok, messages)
    if tool_format(tok).inject:
        return chat_ids(tok, described(messages, tools))
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def described(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with ``tools`` described in the system message and past calls and results written in
    the tagged format (for a template that has no tool format of its own)."""
    head = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = out[0]["content"] + "\n\n" + head
    else:
        out.insert(0, {"role": "system", "content": head})
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            tags = [
                OPEN
                + "\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n"
                + CLOSE
                for c in calls
            ]
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + tags)
        if m["role"] == "tool":
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
    return out


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
    mode = "tagged" if fmt.tagged else "bare"
    if not svc.grammars.available():
        return ToolPlan(None, mode)  # read, not held to a grammar
    call = call_schema(req.tools, None, "arguments" if fmt.tagged else "parameters")
    if isinstance(call, Refusal):
        return call
    parallel = req.parallel_tool_calls is not False
    added = svc.tokenizer.get_added_vocab() if hasattr(svc.tokenizer, "get_added_vocab") else {}
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


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _value_end(s: str, i: int) -> tuple[int | None, int]:
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
    depth, in_str, esc = 0, False, False
    for j in range(i, len(s)):
        ch = s[j]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1, j + 1
    return None, len(s)


@dataclass
class _Scan:
    """How far one call object ``{"name": ..., "arguments": ...}`` has been written."""

    name: str | None = None
    args: tuple[int, int] | None = None  # the arguments' span, (start, known end)
    args_done: bool = False
    end: int | None = None  # just past the object's closing brace
    error: bool = False


def _scan(s: str, final: bool) -> _Scan:
    """Read the call object at the start of ``s`` (after blanks) as far as it is written."""
    out = _Scan()
    dec = json.JSONDecoder()
    i = _skip(s, 0)
    if i == len(s):
        out.error = final
        return out
    if s[i] != "{":
        out.error = True
        return out
    i += 1
    while True:
        i = _skip(s, i)
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
        i = _skip(s, i)
        if i == len(s):
            break
        if s[i] != ":":
            out.error = True
            return out
        i = _skip(s, i + 1)
        end, known = _value_end(s, i)
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
        i = _skip(s, end)
        if i == len(s):
            break
        if s[i] == ",":
            i += 1
        elif s[i] != "}":
            out.error = True
            return out
    out.error = final
    return out


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
                hold = 0 if final else _partial(self.buf, OPEN)
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
        scan = _scan(s, final)
        if scan.error:
            return self._broken(s)
        out: list[dict[str, Any]] = []
        if scan.name is not None and scan.args is not None:
            if not self._sent_head:
                self._id, self._sent_head, self._sent_args = _new_id(), True, 0
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
            self._id = _new_id()
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
        at = _skip(s, 0)
        end, _ = _value_end(s, at)
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
                "id": _new_id(),
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


def _partial(s: str, tag: str) -> int:
    """The length of the longest end of ``s`` that begins ``tag``."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if tag.startswith(s[-n:]):
            return n
    return 0


def split(text: str, mode: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer as OpenAI's message ``content`` and ``tool_calls`` (no calls: the text, as written)."""
    reader = Calls(mode)
    reader.feed(text)
    reader.close()
    if not reader.calls:
        return text, []
    content = "".join(reader.content)
    return (content if content.strip() else None), reader.calls
