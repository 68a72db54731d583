"""Chat prompts with tools, rendered as the chat template renders them (transformers' tokenizer only, no
torch): what the server's ``/v1/chat/completions`` builds a prompt with and what `train` and `eval` render
tool-calling rows with, so that what is trained is exactly what is served.

- `tool_format`: the template's tool format (``tagged`` ``<tool_call>``, ``bare`` Llama 3.x JSON, or a
  marker format of `MARKED`), and whether it ignores ``tools`` (then they are described in a system
  message, `described`).
- `chat_messages`: a conversation (OpenAI's shape: assistant ``tool_calls`` with arguments as objects,
  ``tool`` results with their ``tool_call_id``) and its tools as the template is given them: as they are
  where the template shows tools and calls itself; in a marker format, Mistral's 9-character ids and the
  calls written into the content where the template shows none (`history`); where it ignores ``tools``,
  described in a system message with earlier calls and results written in the tagged format.
- `chat_prompt`: the prompt's token ids, ready for the assistant's turn; `chat_text`: the same rendering
  as text, with or without the generation prompt (`train` learns each assistant turn after it).
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ARGS",
    "CALL_ID",
    "CLOSE",
    "DS_BEGIN",
    "DS_CALL",
    "DS_CALL_END",
    "DS_END",
    "DS_SEP",
    "GRANITE",
    "MARKED",
    "OPEN",
    "TC",
    "TOOLS_PROMPT",
    "ToolFormat",
    "chat_ids",
    "chat_messages",
    "chat_prompt",
    "chat_text",
    "described",
    "history",
    "marked_described",
    "short_id",
    "template_format",
    "tool_format",
    "written",
]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TC, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
GRANITE = "<|tool_call|>"
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"

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

Messages = list[dict[str, Any]]


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The chat template applied to ``messages``, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return _as_ids(ids)


def _as_ids(ids: Any) -> list[int]:
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


# --- the template's format --------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """How the model writes calls: ``tagged`` (``<tool_call>``), bare JSON, or ``kind``, one of `MARKED`;
    ``inject``: the template ignores ``tools``, so they are described in a system message."""

    tagged: bool = True
    inject: bool = False
    kind: str = "tagged"


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
    marked = template_format(tpl)
    tagged = not marked and (
        OPEN in tpl or not ("<|python_tag|>" in tpl or '"parameters": dictionary' in tpl)
    )
    kind = marked or ("tagged" if tagged else "bare")
    try:
        shown = tok.apply_chat_template(
            [{"role": "user", "content": "x"}], tools=_PROBE, add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that breaks on tools: described in a system message instead
        return ToolFormat(tagged=not marked, inject=True, kind=marked or "tagged")
    return ToolFormat(tagged=tagged, inject="probe_fn_x7" not in str(shown), kind=kind)


def template_format(template: str) -> str | None:
    """The marker format a chat template names (None: none of them)."""
    if DS_BEGIN in template or DS_CALL in template:
        return "deepseek" if "```json" in template else "deepseek_v31"
    if TC in template:
        return "mistral_args" if ARGS in template else "mistral"
    if GRANITE in template:
        return "granite"
    if "[func_name1(" in template:
        return "pythonic"
    return None


# --- calls as the marker formats write them -----------------------------------------------------------


def _args_text(call: dict[str, Any]) -> str:
    args = call["function"].get("arguments", {})
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _listed(trigger: str) -> Callable[[Messages], str]:
    def write(calls: Messages) -> str:
        items = [
            f'{{"name": {json.dumps(c["function"]["name"])}, "arguments": {_args_text(c)}}}' for c in calls
        ]
        return trigger + "[" + ", ".join(items) + "]"

    return write


def _mistral_args(calls: Messages) -> str:
    return "".join(f"{TC}{c['function']['name']}{ARGS}{_args_text(c)}" for c in calls)


def _deepseek(calls: Messages) -> str:
    one = [
        f"{DS_CALL}function{DS_SEP}{c['function']['name']}\n```json\n{_args_text(c)}\n```{DS_CALL_END}"
        for c in calls
    ]
    return DS_BEGIN + "\n".join(one) + DS_END


def _deepseek_v31(calls: Messages) -> str:
    one = [f"{DS_CALL}{c['function']['name']}{DS_SEP}{_args_text(c)}{DS_CALL_END}" for c in calls]
    return DS_BEGIN + "".join(one) + DS_END


def _python(value: Any) -> str:
    """``value`` (JSON's) as a Python literal."""
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_python(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_python(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def _pythonic(calls: Messages) -> str:
    one = []
    for c in calls:
        args = c["function"].get("arguments") or {}
        args = json.loads(args) if isinstance(args, str) else args
        one.append(
            c["function"]["name"] + "(" + ", ".join(f"{k}={_python(v)}" for k, v in args.items()) + ")"
        )
    return "[" + ", ".join(one) + "]"


#: the marker formats (the server's readers: ``toolformats``, ``toolpython``) and how each writes calls
MARKED: dict[str, Callable[[Messages], str]] = {
    "mistral": _listed(TC),
    "mistral_args": _mistral_args,
    "granite": _listed(GRANITE),
    "deepseek": _deepseek,
    "deepseek_v31": _deepseek_v31,
    "pythonic": _pythonic,
}
_SHORT_IDS = frozenset({"mistral", "mistral_args"})
_EXAMPLE = {"function": {"name": "<function-name>", "arguments": {"<arg>": "<value>"}}}


def written(kind: str, calls: Messages) -> str:
    """``calls`` (a message's ``tool_calls``) as the model writes them in the marker format ``kind``."""
    return MARKED[kind](calls)


def marked_described(kind: str, tools: Messages) -> str:
    """``tools`` described, in the marker format ``kind``, for a template that does not show them."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
        f"</tools>\n\nTo call functions, answer with:\n{written(kind, [_EXAMPLE])}"
    )


def short_id(call_id: str) -> str:
    """A history's call id as Mistral's templates take it: itself when 9 letters or digits, else 9 drawn
    from its hash (the same for the call and its result)."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    digest = int(hashlib.sha256(call_id.encode()).hexdigest(), 16)
    alphabet = string.ascii_letters + string.digits
    out = ""
    for _ in range(9):
        digest, k = divmod(digest, len(alphabet))
        out += alphabet[k]
    return out


def history(kind: str, tok: Any, messages: Messages) -> Messages:
    """``messages`` as the ``kind`` marker format's template takes them: Mistral's 9-character ids; an
    empty content of a message with calls as the template shows calls with (None or ""); and the calls
    written into the content, in the format, where the template shows none."""
    short = kind in _SHORT_IDS
    out = [dict(m) for m in messages]
    if not any(m.get("tool_calls") for m in out):
        return out
    shows, empty = _calls_shown(tok)
    for m in out:
        if short and m.get("tool_call_id"):
            m["tool_call_id"] = short_id(m["tool_call_id"])
        calls = m.get("tool_calls")
        if not calls:
            continue
        if short:
            m["tool_calls"] = calls = [{**c, "id": short_id(str(c.get("id") or ""))} for c in calls]
        if not shows:
            del m["tool_calls"]
            m["content"] = (m.get("content") or "") + written(kind, calls)
        elif not m.get("content"):
            m["content"] = empty
    return out


def _calls_shown(tok: Any) -> tuple[bool, str | None]:
    """Whether the chat template writes an assistant message's ``tool_calls``, and the empty content it
    does so with (None or ""; arguments as an object or as text; a template that fails on all is taken to)."""
    rendered = False
    arguments: tuple[Any, ...] = ({}, "{}")
    for content in (None, ""):
        for args in arguments:
            probe = {
                "id": "probe0001",
                "type": "function",
                "function": {"name": "probe_fn_x7", "arguments": args},
            }
            msgs = [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": content, "tool_calls": [probe]},
            ]
            try:
                shown = str(tok.apply_chat_template(msgs, tokenize=False))
            except Exception:
                continue
            if "probe_fn_x7" in shown:
                return True, content
            rendered = True
    return not rendered, None


# --- the prompt -----------------------------------------------------------------------------------------


def chat_messages(tok: Any, messages: Messages, tools: Messages | None) -> tuple[Messages, Messages | None]:
    """``messages`` and ``tools`` as the chat template is given them (see the module's doc; ``tools``
    None: the template is not given them, they are in the messages if anywhere)."""
    if not tools:
        return [dict(m) for m in messages], None
    fmt = tool_format(tok)
    if fmt.inject and fmt.kind not in MARKED:
        return described(messages, tools), None
    if fmt.kind in MARKED:
        messages = history(fmt.kind, tok, messages)
        if fmt.inject:
            return _system(messages, marked_described(fmt.kind, tools)), None
    return [dict(m) for m in messages], tools


def chat_prompt(tok: Any, messages: Messages, tools: Messages | None) -> list[int]:
    """The prompt's token ids: the chat template applied to ``messages`` with ``tools`` in its own
    format (raises what the template raises)."""
    if not tools:
        return chat_ids(tok, messages)
    msgs, given = chat_messages(tok, messages, tools)
    try:
        return _ids(tok, msgs, given)
    except TypeError:  # a template that joins the calls' arguments as text (DeepSeek's): give it text
        return _ids(tok, _text_arguments(msgs), given)


def chat_text(tok: Any, messages: Messages, tools: Messages | None, *, generation: bool) -> str:
    """The text `chat_prompt` tokenizes (``generation``: ready for the assistant's turn; else the
    conversation as it stands, its last turn closed)."""
    msgs, given = chat_messages(tok, messages, tools)
    kw: dict[str, Any] = {"tools": given} if given else {}
    try:
        return str(tok.apply_chat_template(msgs, add_generation_prompt=generation, tokenize=False, **kw))
    except TypeError:
        if not tools:
            raise
        msgs = _text_arguments(msgs)
        return str(tok.apply_chat_template(msgs, add_generation_prompt=generation, tokenize=False, **kw))


def _ids(tok: Any, messages: Messages, tools: Messages | None) -> list[int]:
    if not tools:
        return chat_ids(tok, messages)
    return _as_ids(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True))


def _text_arguments(messages: Messages) -> Messages:
    """``messages`` with their calls' arguments as JSON text."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                if not isinstance(c["function"]["arguments"], str)
                else c
                for c in m["tool_calls"]
            ]
    return out


def _system(messages: Messages, head: str) -> Messages:
    """``messages`` with ``head`` at the end of the system message (one added where there is none)."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = out[0]["content"] + "\n\n" + head
    else:
        out.insert(0, {"role": "system", "content": head})
    return out


def described(messages: Messages, tools: Messages) -> Messages:
    """``messages`` with ``tools`` described in the system message and past calls and results written in
    the tagged format (for a template that has no tool format of its own)."""
    head = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    out = _system(messages, head)
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
