"""Run huggingface_hub's own test suite against a local ``adapterhub serve``, with Xet on.

    python bench/hub_suite.py /tmp/hfh [--python PY] [--out results.json] [-k EXPR] [FILE ...]

CHECKOUT is a checkout of https://github.com/huggingface/huggingface_hub (nothing is fetched here). Its
``tests/`` folder and ``pyproject.toml`` (for the pytest settings) are copied to a scratch folder, where:

- ``tests/testing_constants.py`` gets the local server's URL as ``ENDPOINT_STAGING`` and the users and
  tokens made with ``adapterhub --home H token create USER --write`` (valid user names: the Hub's test
  names start with ``__``, which this server refuses; a user's full name is its name here);
- the pytest ``env`` setting ``HUGGINGFACE_CO_STAGING=1`` becomes ``HF_ENDPOINT=<server>``, so that code
  under test that uses the default endpoint talks to the local server too;
- the checkout's ``src/`` is not copied, so the tests import the INSTALLED huggingface_hub (the one next
  to ``--python``, which also needs pytest-mock, pytest-env, pytest-vcr and pytest-asyncio).

Xet is left on (``HF_HUB_DISABLE_XET`` is removed from the environment). A small pytest plugin records,
per test, whether it sent any request to the server (those are "the tests that need a server"), its
outcome and the first line of its error. The script prints counts and writes them as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

FILES = ("tests/test_hf_api.py", "tests/test_file_download.py", "tests/test_snapshot_download.py")
USERS = {"USER": "hubuser", "OTHER_USER": "dvuser", "ENTERPRISE_USER": "enterpriseadmin"}
TOKENS = {"USER": "TOKEN", "OTHER_USER": "OTHER_TOKEN", "ENTERPRISE_USER": "ENTERPRISE_TOKEN"}

PLUGIN = '''
"""Records, per test, whether it sent a request to the server, and its outcome."""
import json, os
import httpx2
import pytest

SERVER = os.environ["HUB_SUITE_SERVER"].rstrip("/")
OUT = os.environ["HUB_SUITE_OUT"]
_touched = set()
_current = [None]
_results = {}


def _wrap(cls, name):
    original = getattr(cls, name)
    if getattr(original, "_hub_suite", False):
        return

    def send(self, request, *a, **kw):
        if str(request.url).startswith(SERVER) and _current[0] is not None:
            _touched.add(_current[0])
        return original(self, request, *a, **kw)

    send._hub_suite = True
    setattr(cls, name, send)


_wrap(httpx2.HTTPTransport, "handle_request")
_wrap(httpx2.AsyncHTTPTransport, "handle_async_request")


class _Missing:
    """Stands for a name the checkout's tests import but the installed huggingface_hub lacks."""

    def __init__(self, name):
        self._name = name

    def __call__(self, *a, **kw):
        raise NotImplementedError(f"MISSING-IN-INSTALLED-CLIENT: {self._name}")

    def __getattr__(self, attr):
        raise NotImplementedError(f"MISSING-IN-INSTALLED-CLIENT: {self._name}.{attr}")


def pytest_configure(config):
    """Names the tests import from huggingface_hub that the installed version does not have get a
    stand-in, so that the other tests of the file still run (the tests using them fail, by that name)."""
    import ast, importlib, glob
    missing = []
    for path in glob.glob("tests/*.py"):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("huggingface_hub"):
                try:
                    mod = importlib.import_module(node.module)
                except ImportError:
                    continue
                for alias in node.names:
                    if not hasattr(mod, alias.name):
                        try:
                            importlib.import_module(node.module + "." + alias.name)
                        except ImportError:
                            setattr(mod, alias.name, _Missing(node.module + "." + alias.name))
                            missing.append(node.module + "." + alias.name)
    with open(OUT + ".missing", "w") as f:
        json.dump(sorted(set(missing)), f)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    r = _results.setdefault(item.nodeid, {"outcome": "passed", "error": ""})
    if rep.failed:
        r["outcome"] = "failed" if rep.when == "call" else "error"
        text = ""
        if call.excinfo is not None:
            text = f"{call.excinfo.typename}: {call.excinfo.value}"
        r["error"] = r["error"] or text[:600]
    elif rep.skipped and r["outcome"] == "passed":
        r["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    for nodeid, r in _results.items():
        r["server"] = nodeid in _touched
    with open(OUT, "w") as f:
        json.dump(_results, f, indent=1, sort_keys=True)
'''


def make_tokens(adapterhub: list[str], home: Path) -> dict[str, str]:
    out = {}
    for key, user in USERS.items():
        proc = subprocess.run(
            [*adapterhub, "--home", str(home), "token", "create", user, "--write"],
            capture_output=True,
            text=True,
            check=True,
        )
        token = next(line.strip() for line in proc.stdout.splitlines() if line.strip())
        out[TOKENS[key]] = token
    return out


def patch_constants(path: Path, url: str, tokens: dict[str, str]) -> None:
    text = path.read_text()
    values = {
        "ENDPOINT_STAGING": url,
        **USERS,
        **tokens,
        "ENTERPRISE_ORG": "enterpriseorg",
        "FULL_NAME": USERS["USER"],
    }
    for name, value in values.items():
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, flags=re.M)
        if n != 1:
            raise SystemExit(f"{path}: no single assignment of {name} to replace")
    path.write_text(text)


def patch_pyproject(src: Path, dest: Path, url: str) -> None:
    text = src.read_text()
    if '"HUGGINGFACE_CO_STAGING=1"' not in text:
        raise SystemExit(f"{src}: no HUGGINGFACE_CO_STAGING=1 in the pytest env settings")
    dest.write_text(text.replace('"HUGGINGFACE_CO_STAGING=1"', f'"HF_ENDPOINT={url}"'))


def start_server(adapterhub: list[str], home: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERHUB_DB", "ADAPTERHUB_HOME")}
    proc = subprocess.Popen(
        [*adapterhub, "--home", str(home), "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
        cwd=home,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the server did not start; see {log}")
    return proc, line.split()[-1]


def summarize(results: dict[str, dict[str, object]], also: set[str] | None = None) -> dict[str, object]:
    """Counts over the tests that sent a request to the server (in this run, or in the run ``also`` names:
    a class fixture that fails marks only its first test as having asked)."""
    need = {k: v for k, v in results.items() if v["server"] or k in (also or set())}
    counts = Counter(str(v["outcome"]) for v in need.values())
    failing = {k: str(v["error"]) for k, v in need.items() if v["outcome"] in ("failed", "error")}
    return {
        "tests": len(results),
        "need_server": len(need),
        "outcomes_need_server": dict(counts),
        "outcomes_all": dict(Counter(str(v["outcome"]) for v in results.values())),
        "failing": failing,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkout", type=Path, help="a checkout of huggingface/huggingface_hub")
    ap.add_argument("files", nargs="*", default=list(FILES), help="test files, relative to the checkout")
    ap.add_argument("--python", default=sys.executable, help="the Python with huggingface_hub and pytest")
    ap.add_argument("--adapterhub", default=None, help="the adapterhub command (default: PY -m adapterhub)")
    ap.add_argument("--out", type=Path, default=None, help="write the per-test results and counts here")
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument(
        "--union-with",
        type=Path,
        default=None,
        help="an earlier --out file: count the tests that needed the server there too",
    )
    args = ap.parse_args()
    checkout = args.checkout.resolve()
    if not (checkout / "tests" / "testing_constants.py").is_file():
        raise SystemExit(f"{checkout} is not a huggingface_hub checkout (no tests/testing_constants.py)")
    adapterhub = args.adapterhub.split() if args.adapterhub else [sys.executable, "-m", "adapterhub"]
    scratch = Path(tempfile.mkdtemp(prefix="hub-suite-"))
    run = scratch / "run"
    shutil.copytree(checkout / "tests", run / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    home = scratch / "home"
    tokens = make_tokens(adapterhub, home)
    proc, url = start_server(adapterhub, home, scratch / "server.log")
    try:
        patch_constants(run / "tests" / "testing_constants.py", url, tokens)
        patch_pyproject(checkout / "pyproject.toml", run / "pyproject.toml", url)
        (run / "hub_suite_plugin.py").write_text(PLUGIN)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HUB_SUITE_SERVER=url, HUB_SUITE_OUT=str(scratch / "results.json"), PYTHONPATH=str(run))
        env["HF_HOME"] = str(scratch / "hf-home")
        cmd = [
            args.python,
            "-m",
            "pytest",
            "-p",
            "hub_suite_plugin",
            "-p",
            "no:cacheprovider",
            "-q",
            "-o",
            "addopts=-Werror::FutureWarning --strict-markers",
            "-m",
            "not production",
            "--tb=no",
            "-rN",
            *args.files,
        ]
        if args.k:
            cmd += ["-k", args.k]
        start = time.time()
        subprocess.run(cmd, cwd=run, env=env, check=False)
        took = time.time() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    results = json.loads((scratch / "results.json").read_text())
    also: set[str] = set()
    if args.union_with:
        earlier = json.loads(args.union_with.read_text())["results"]
        also = {k for k, v in earlier.items() if v["server"]}
    summary = summarize(results, also)
    summary["seconds"] = round(took)
    summary["server"] = "adapterhub serve (SQLite), Xet on"
    print(json.dumps({k: v for k, v in summary.items() if k != "failing"}, indent=1))
    failing: dict[str, str] = summary["failing"]  # type: ignore[assignment]
    for nodeid, err in sorted(failing.items()):
        print(f"FAIL {nodeid}: {err.splitlines()[0][:200] if err else ''}")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "results": results}, indent=1, sort_keys=True))
    if args.keep:
        print(f"scratch folder: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
