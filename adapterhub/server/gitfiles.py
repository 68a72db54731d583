"""What a repo's ``.gitignore`` and ``.gitattributes`` say about a path, as the Hub reads them: ignored
files are answered ``shouldIgnore`` at preupload (the client then leaves them out of the commit), and a
path that ``.gitattributes`` sends through ``filter=lfs`` is uploaded through LFS.

Patterns follow gitignore(5): ``#`` comments, ``!`` negation, a trailing ``/`` for folders only, a
pattern with a ``/`` anchored at the root (else it matches at any depth), ``*``, ``?``, ``[...]`` and
``**``; the last matching pattern wins, and a file inside an ignored folder is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RULES_FILE_LIMIT = 1024 * 1024
_MAX_PATTERNS = 10_000


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def _glob_to_regex(glob: str) -> str:
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and (j := glob.find("]", i + 2)) != -1:
            body = glob[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        elif c == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def compile_pattern(line: str) -> Pattern | None:
    """One gitignore line -> a pattern, or None for a blank line, a comment or a pattern that is not valid."""
    line = line.rstrip("\r\n")
    if not line.endswith("\\ "):
        line = line.rstrip(" ")
    if not line or line.startswith("#"):
        return None
    negated = line.startswith("!")
    if negated or line.startswith("\\!") or line.startswith("\\#"):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    regex = ("" if anchored else "(?:.*/)?") + _glob_to_regex(line)
    try:
        return Pattern(re.compile(f"^{regex}$", re.S), negated, dir_only)
    except re.error:
        return None


def compile_rules(text: str) -> list[Pattern]:
    patterns = (compile_pattern(line) for line in text.splitlines()[:_MAX_PATTERNS])
    return [p for p in patterns if p is not None]


def _state(patterns: list[Pattern], path: str, is_dir: bool) -> bool | None:
    state = None
    for p in patterns:
        if (is_dir or not p.dir_only) and p.regex.match(path):
            state = not p.negated
    return state


def is_ignored(patterns: list[Pattern], path: str) -> bool:
    """Whether ``path`` (a file) is ignored: itself, or one of the folders it is in."""
    if not patterns:
        return False
    parts = path.split("/")
    for i in range(1, len(parts)):
        if _state(patterns, "/".join(parts[:i]), True):
            return True
    return bool(_state(patterns, path, False))


def lfs_patterns(gitattributes: str) -> list[Pattern]:
    """The patterns of a ``.gitattributes`` with their LFS setting: ``filter=lfs`` sets it, ``-filter``,
    ``!filter`` or another filter unsets it (as a negated pattern, so that the last line wins)."""
    out: list[Pattern] = []
    for line in gitattributes.splitlines()[:_MAX_PATTERNS]:
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        attrs = fields[1:]
        lfs = None
        for a in attrs:
            if a == "filter=lfs":
                lfs = True
            elif a in ("-filter", "!filter") or a.startswith("filter="):
                lfs = False
        if lfs is None:
            continue
        p = compile_pattern(fields[0])
        if p is not None and not p.negated:
            out.append(Pattern(p.regex, not lfs, False))
    return out


def is_lfs(patterns: list[Pattern], path: str) -> bool:
    return bool(_state(patterns, path, False))
