"""Training data for `training.train`: JSONL rows read with bounded memory, encoded to (ids, labels),
split for evaluation and put into length-grouped batches, or packed (`pack`, ``--packing``) into rows
of ``--max-length`` tokens whose documents each attend only to themselves.

Data is JSONL, one example a line, in one of three shapes (the first line decides; every line must match):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the base's chat template; the loss
  is on the assistant turns only (their text and the end-of-turn marker the template puts after them);
  with function calling as OpenAI's fine-tuning and TRL take it, ``{"tools": [{"type": "function",
  "function": {...}}], "messages": [...]}`` whose assistant turns may carry ``tool_calls`` (``content``
  null or text; each ``{"id"?, "type": "function", "function": {"name", "arguments": JSON text or
  object}}``) answered by ``tool`` messages (``tool_call_id`` optional: the calls in order). Such a row is
  rendered exactly as the server renders a request with that history and those tools
  (`runtime.chat.chat_prompt`): the tokens before each assistant turn are the server's prompt for the
  history before it, a call turn's target is the text the server reads back into those calls (the
  template's own tool format, or, for a template that ignores ``tools`` such as SmolLM2's, the tools
  described in a system turn and the calls written ``<tool_call>{"name", "arguments"}</tool_call>``);
  call turns are learned, tool results are not;
- ``{"prompt": ..., "completion": ...}``: prompt and completion joined, loss on the completion (and EOS);
- ``{"text": ...}``: loss on every token (and EOS).

Hostile files fail in one line that names the file and the line, before anything is loaded: only a
regular file is opened (a FIFO would block, ``/dev/zero`` never ends), a line is read at most
`line_limit` bytes at a time (a 200 MB line is refused after the first megabyte, never tokenized), and
JSON nested past the parser's depth is refused with its line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError, TrainingDataError

__all__ = ["batches", "chat_row", "collate", "encode_rows", "line_limit", "pack", "read_rows", "split_eval"]

SHAPES: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    "prompt": frozenset({"prompt", "completion"}),
    "text": frozenset({"text"}),
}
ROLES = frozenset({"system", "user", "assistant", "tool"})
#: the keys a message may have (besides role and content), by role
_EXTRA = {
    "assistant": {"tool_calls", "name"},
    "tool": {"tool_call_id", "name"},
    "system": {"name"},
    "user": {"name"},
}
Rows = list[tuple[int, dict[str, Any]]]
Encoded = list[tuple[list[int], list[int]]]
#: a training row: (input ids, labels), and for a packed row the position ids (restarting at each document)
Example = tuple[list[int], ...]

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def line_limit(max_length: int) -> int:
    """The most bytes a data line may take: 1 MiB, or 256 bytes a token for a larger ``max_length``
    (far above what ``max_length`` tokens of any text take, even JSON-escaped)."""
    return max(1 << 20, 256 * max_length)


def _bad(path: Path, line: int, why: str) -> TrainingDataError:
    return TrainingDataError(f"{path}, line {line}: {why}", path=str(path), line=line)


def _open(p: Path) -> Any:
    try:
        st = os.stat(p)
    except OSError as exc:
        raise InvalidOptionError(f"cannot read training data {p}: {exc.strerror or exc}") from None
    for test, what in _KINDS:
        if test(st.st_mode):
            raise InvalidOptionError(f"training data {p} is {what}, not a file; give a JSONL file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidOptionError(f"training data {p} is not a regular file; give a JSONL file")
    try:
        return open(p, "rb")  # noqa: SIM115 - closed by the caller's with
    except OSError as exc:
        raise InvalidOptionError(f"cannot read training data {p}: {exc.strerror or exc}") from None


def read_rows(path: str | os.PathLike[str], *, max_length: int = 512) -> tuple[Rows, str, str]:
    """((line number, row) for every non-blank line, the shape, the file's sha256); checked throughout."""
    p = Path(path)
    limit = line_limit(max_length)
    rows: Rows = []
    shape: str | None = None
    digest = hashlib.sha256()
    with _open(p) as f:
        n = 0
        while True:
            line = f.readline(limit + 1)
            if not line:
                break
            n += 1
            digest.update(line)
            if len(line) > limit and not line.endswith(b"\n"):
                raise _bad(
                    p,
                    n,
                    f"longer than {limit >> 10} KiB; no row within --max-length {max_length} is that long",
                )
            if not line.strip():
                continue
            row = _parse(p, n, line)
            kind = _shape(p, n, row)
            if shape is not None and kind != shape:
                raise _bad(p, n, f"a {kind!r} row in a file of {shape!r} rows; use one shape per file")
            shape = kind
            _check_row(p, n, kind, row)
            rows.append((n, row))
    if not rows or shape is None:
        raise InvalidOptionError(f"{p} holds no training examples (one JSON object per line)")
    return rows, shape, digest.hexdigest()


def _parse(p: Path, n: int, line: bytes) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except RecursionError:
        raise _bad(p, n, "JSON nested too deeply; a row is a flat object") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(p, n, f"not valid JSON ({exc})") from None
    if not isinstance(row, dict):
        raise _bad(p, n, f"each line must be a JSON object, got {type(row).__name__}")
    return row


def _shape(p: Path, n: int, row: dict[str, Any]) -> str:
    keys = frozenset(row)
    if "messages" in keys:
        keys -= {"tools"}
    kind = next((k for k, ks in SHAPES.items() if keys == ks), None)
    if kind is None:
        unknown = sorted(keys - {k for ks in SHAPES.values() for k in ks})
        what = (
            f"unknown keys {', '.join(unknown)}" if unknown else f"keys {', '.join(sorted(keys)) or '(none)'}"
        )
        raise _bad(
            p,
            n,
            f'{what}; a row is {{"messages": [...]}} (and "tools"), {{"prompt", "completion"}} or {{"text"}}',
        )
    return kind


def _check_row(p: Path, n: int, kind: str, row: dict[str, Any]) -> None:
    if kind == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _bad(p, n, "messages must be a non-empty list of {role, content} objects")
        if "tools" in row:
            _check_tools(p, n, row["tools"])
        pending: list[str | None] = []  # the ids of the calls not answered yet
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise _bad(
                    p, n, f"message {i} must be an object whose role is one of {', '.join(sorted(ROLES))}"
                )
            role = m["role"]
            extra = set(m) - {"role", "content"} - _EXTRA[role]
            if extra:
                raise _bad(p, n, f"message {i}: a message of role {role} has no {', '.join(sorted(extra))}")
            calls = m.get("tool_calls")
            if calls is not None:
                pending = _check_calls(p, n, i, calls)
                if "tools" not in row:
                    raise _bad(p, n, f'message {i} has tool_calls but the row has no "tools"')
            content_ok = isinstance(m.get("content"), str) or (calls and m.get("content") is None)
            if not content_ok:
                raise _bad(p, n, f"message {i}: content must be text (null only beside tool_calls)")
            if "name" in m and not isinstance(m["name"], str):
                raise _bad(p, n, f"message {i}: name must be text")
            if role == "tool":
                pending = _check_result(p, n, i, m, pending)
        if not any(m["role"] == "assistant" for m in msgs):
            raise _bad(p, n, "no assistant message: nothing to learn from")
    else:
        for k, v in row.items():
            if not isinstance(v, str):
                raise _bad(p, n, f"{k} must be text, got {type(v).__name__}")
        if not (row.get("completion") if kind == "prompt" else row.get("text")):
            raise _bad(p, n, "empty completion: nothing to learn from" if kind == "prompt" else "empty text")


def _check_tools(p: Path, n: int, tools: Any) -> None:
    if not isinstance(tools, list) or not tools:
        raise _bad(p, n, 'tools must be a non-empty list of {"type": "function", "function": {...}}')
    for k, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(p, n, f'tool {k} must be {{"type": "function", "function": {{"name", "parameters"}}}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(p, n, f"tool {k}: function has no name")
        if not isinstance(fn.get("parameters", {}), dict):
            raise _bad(p, n, f"tool {k}: parameters must be a JSON schema object")


def _check_calls(p: Path, n: int, i: int, calls: Any) -> list[str | None]:
    """Check an assistant message's ``tool_calls``; their ids."""
    if not isinstance(calls, list) or not calls:
        raise _bad(p, n, f"message {i}: tool_calls must be a non-empty list of calls")
    ids: list[str | None] = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not isinstance(fn, dict) or set(c) - {"id", "type", "function"}:
            raise _bad(
                p, n, f'message {i}, call {k}: a call is {{"id"?, "type": "function", "function": {{...}}}}'
            )
        if c.get("type", "function") != "function" or not isinstance(c.get("id", ""), str):
            raise _bad(p, n, f'message {i}, call {k}: type must be "function" and id text')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(p, n, f"message {i}, call {k}: no function name")
        if set(fn) - {"name", "arguments"} or "arguments" not in fn:
            raise _bad(p, n, f"message {i}, call {k}: function must be exactly name and arguments")
        args = fn["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                raise _bad(p, n, f"message {i}, call {k}: arguments are not valid JSON") from None
        if not isinstance(args, dict):
            raise _bad(p, n, f"message {i}, call {k}: arguments must be a JSON object")
        ids.append(c.get("id"))
    return ids


def _check_result(p: Path, n: int, i: int, m: dict[str, Any], pending: list[str | None]) -> list[str | None]:
    """Check a tool message answers a call made before it; the calls still unanswered."""
    if not pending:
        raise _bad(p, n, f"message {i}: a tool result with no tool call before it")
    want = m.get("tool_call_id")
    if want is None:
        return pending[1:]
    if not isinstance(want, str) or want not in pending:
        raise _bad(
            p, n, f"message {i}: tool_call_id {want!r} names no call of the assistant message before it"
        )
    return [c for c in pending if c != want]


def chat_row(row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A checked ``messages`` row as the server's requests reach the chat template (``tools.flat_message``):
    content text ("" for null), calls' arguments as objects, and ids where the row gave none (call ``k`` of
    message ``i`` is ``call_i_k``; a result without ``tool_call_id`` answers the next call in order)."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for i, m in enumerate(row["messages"]):
        flat: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("name"):
            flat["name"] = m["name"]
        if m["role"] == "tool":
            want = m.get("tool_call_id") or (pending[0] if pending else "")
            flat["tool_call_id"] = want
            pending = [c for c in pending if c != want]
        if m.get("tool_calls"):
            calls: list[dict[str, Any]] = []
            for k, c in enumerate(m["tool_calls"]):
                args = c["function"]["arguments"]
                fn = {
                    "name": c["function"]["name"],
                    "arguments": json.loads(args) if isinstance(args, str) else args,
                }
                calls.append({"id": c.get("id") or f"call_{i}_{k}", "type": "function", "function": fn})
            flat["tool_calls"] = calls
            pending = [str(c["id"]) for c in calls]
        out.append(flat)
    return out, row.get("tools")


# ------------------------------------------------------------------ encoding
def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    return list(enc["input_ids"]), (list(map(tuple, enc["offset_mapping"])) if tokenizer.is_fast else None)


def _encode_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels: the id where a token starts inside one of ``spans``, else -100."""
    ids, offsets = _offsets(tokenizer, text)
    if offsets is None:  # a slow tokenizer: tokenize the pieces one after another
        labels: list[int] = []
        ids, at = [], 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, learn in ((text[at:a], False), (text[a:b], True)):
                if piece:
                    t = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += t
                    labels += t if learn else [-100] * len(t)
            at = b
        return ids, labels
    labels = [
        i if any(a <= s < b for a, b in spans) else -100 for i, (s, _) in zip(ids, offsets, strict=True)
    ]
    return ids, labels


def _encode(tokenizer: Any, kind: str, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token or ""
    if kind == "messages":
        from ..runtime.chat import chat_text

        msgs, tools = chat_row(row)
        full = chat_text(tokenizer, msgs, tools, generation=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = chat_text(tokenizer, msgs[:i], tools, generation=True) if i else ""
            upto = chat_text(tokenizer, msgs[: i + 1], tools, generation=False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise InvalidOptionError(
                    "the base's chat template does not render conversations turn by turn; use prompt/completion rows"
                )
            spans.append((len(before), len(upto)))
        return _encode_spans(tokenizer, full, spans)
    if kind == "prompt":
        text = row["prompt"] + row["completion"] + eos
        return _encode_spans(tokenizer, text, [(len(row["prompt"]), len(text))])
    text = row["text"] + eos
    return _encode_spans(tokenizer, text, [(0, len(text))])


def encode_rows(
    tokenizer: Any, rows: Sequence[tuple[int, dict[str, Any]]], kind: str, *, max_length: int, path: Path
) -> Encoded:
    """(input ids, labels) per row; a row over ``max_length`` tokens or without a label is refused."""
    if getattr(tokenizer, "bos_token_id", None) is not None and kind != "messages":
        bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    else:
        bos = []
    out = []
    for n, row in rows:
        ids, labels = _encode(tokenizer, kind, row)
        ids, labels = bos + ids, [-100] * len(bos) + labels
        if len(ids) > max_length:
            raise _bad(
                path, n, f"{len(ids)} tokens, over --max-length {max_length}; shorten it or raise the limit"
            )
        if sum(1 for x in labels[1:] if x != -100) == 0:
            raise _bad(path, n, "no token to learn from after tokenization")
        out.append((ids, labels))
    return out


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


# ------------------------------------------------------------------ splits and batches
def split_eval(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(train rows, eval rows): a seeded ``fraction`` of the rows (at least one) held out."""
    if not 0 < fraction < 1:
        raise InvalidOptionError(f"--eval-fraction must be between 0 and 1, got {fraction}")
    if len(rows) < 2:
        raise InvalidOptionError("--eval-fraction needs at least two examples; give --eval-data instead")
    order = list(range(len(rows)))
    random.Random(seed ^ 0x5EED).shuffle(order)
    k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def batches(
    lengths: Sequence[int], batch_size: int, steps: int, seed: int, *, group: bool = True
) -> list[list[int]]:
    """``steps`` batches of row indices: the rows shuffled with ``seed`` epoch after epoch; with ``group``,
    each run of 16 batches sorted by length before it is cut (so a batch pads little, as transformers'
    ``group_by_length``), the batches' order shuffled again. Deterministic: a resumed run skips the same
    list's first steps."""
    rng = random.Random(seed)
    n = len(lengths)
    size = min(batch_size, n)
    order: list[int] = []
    out: list[list[int]] = []
    while len(out) < steps:
        fresh = list(range(n))
        rng.shuffle(fresh)
        order += fresh
        while len(order) >= size and len(out) < steps:
            take = min(len(order) // size, 16) * size
            chunk, order = order[:take], order[take:]
            if group:
                chunk.sort(key=lambda i: -lengths[i])
            cut = [chunk[i : i + size] for i in range(0, take, size)]
            if group:
                rng.shuffle(cut)
            out += cut[: steps - len(out)]
    return out


# ------------------------------------------------------------------ packing
def pack(encoded: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[Example]:
    """The examples packed whole into rows of at most ``max_length`` tokens, best fit decreasing (TRL's
    ``packing_strategy="bfd"``: no example is cut), as (ids, labels, position ids). Each example's
    positions restart at 0, which is how transformers' masks see where one document ends
    (`collate`: no attention across documents), and its first label is -100, so no token is learned
    from the end of the document before it: the loss covers exactly the tokens the unpacked run learns."""
    import bisect

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in order:
        n = len(encoded[i][0])
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            left, r = max_length - n, len(rows) - 1
        else:
            left, r = room.pop(at)
            rows[r].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, r))
    out: list[Example] = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            e_ids, e_labels = encoded[i]
            ids += e_ids
            labels += [-100, *e_labels[1:]]
            positions += range(len(e_ids))
        out.append((ids, labels, positions))
    return out


def collate(batch: Sequence[Example], pad: int) -> dict[str, Any]:
    """Tensors for one micro-batch, padded on the right to its longest row. Unpacked rows get an attention
    mask; packed rows get position ids instead (the padding a document of its own, never learned), from
    which transformers builds the block-diagonal causal mask of packed sequences (sdpa, eager, flex and
    flash attention alike; ``find_packed_sequence_indices``) when the model runs with ``use_cache=False``
    (with a cache it looks for no packed sequences)."""
    import torch

    width = max(len(r[0]) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    packed = len(batch[0]) == 3
    extra = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        n = len(row[0])
        ids[r, :n] = torch.tensor(row[0])
        labels[r, :n] = torch.tensor(row[1])
        if packed:
            extra[r, :n] = torch.tensor(row[2])
            extra[r, n:] = torch.arange(width - n)
        else:
            extra[r, :n] = 1
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}
