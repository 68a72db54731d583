"""The web pages of `adapterhub serve` (issue 14): plain HTTP checks of escaping, CSRF, cookies, private
repos, pagination and the spectra, then a real Chromium (Playwright, Debian's /usr/bin/chromium) that
searches, filters, opens an adapter, logs in and out, meets a hostile card, and never leaves 127.0.0.1.

The server is `tests/_pages_server.py` (create_app + mount_pages) in a subprocess on a temporary home.
Screenshots go to ``$ADAPTERHUB_ARTIFACTS`` (default: a temporary folder); with
``ADAPTERHUB_DOCS_IMG=1`` the index and adapter ones are also written to ``docs/img/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from adapterhub import Hub
from adapterhub.server.tokens import create_token

HERE = Path(__file__).parent
CHROMIUM = "/usr/bin/chromium"
HOSTILE = """---
title: "<script>window.__pwned = 'front matter'</script>"
tags: ["<img src=x onerror=alert(1)>"]
---
# Hostile card

<script>window.__pwned = 'body'; alert('body')</script>

<img src="x" onerror="window.__pwned = 'img'; alert('img')">

[a link](javascript:alert('link')) and ![a picture](https://evil.example/p.png)
"""

SECRET = "# Secret card\n\nonly alice reads this\n\n![the plot](plot.png) and [the plot file](./plot.png)\n"


def png() -> bytes:
    """A valid 2 x 2 PNG."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@dataclass
class Site:
    url: str
    home: Path
    alice: str
    bob: str
    names: list[str]
    proc: subprocess.Popen[str]
    sha: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, *, cookie: str | None = None) -> tuple[int, Any, str]:
        headers = {"Cookie": cookie} if cookie else {}
        return self.send(urllib.request.Request(self.url + path, headers=headers))

    def post(
        self,
        path: str,
        form: dict[str, str],
        *,
        cookie: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, str]:
        h = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        if cookie:
            h["Cookie"] = cookie
        req = urllib.request.Request(self.url + path, data=urlencode(form).encode(), headers=h, method="POST")
        return self.send(req)

    @staticmethod
    def send(req: urllib.request.Request) -> tuple[int, Any, str]:
        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a: Any, **k: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read().decode(errors="replace")

    def login_cookie(self, token: str) -> str:
        """A browser's cookies after logging in with ``token`` (CSRF cookie first, as a form needs)."""
        _, headers, body = self.get("/login")
        csrf = csrf_of(headers, body)
        status, h, _ = self.post(
            "/login", {"csrf": csrf, "token": token, "next": "/"}, cookie=f"adapterhub_csrf={csrf}"
        )
        assert status == 303, status
        session = re.search(r"adapterhub_session=([^;]+)", h["Set-Cookie"])
        assert session is not None
        return f"adapterhub_csrf={csrf}; adapterhub_session={session.group(1)}"


def csrf_of(headers: Any, body: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', body)
    assert m is not None
    cookie = " ".join(headers.get_all("Set-Cookie") or [])
    assert f"adapterhub_csrf={m.group(1)}" in cookie or not cookie
    return m.group(1)


def build_home(home: Path, work: Path) -> tuple[list[str], str, str]:
    """Two PEFT adapters, their combination (lineage), a merge, a kohya adapter, a registered base."""
    from helpers.adapters import BASE_NAME, make_catalog_adapter, make_kohya, tiny_llama

    base_dir = work / "base"
    tiny_llama().save_pretrained(str(base_dir), safe_serialization=True)
    with Hub(home) as hub:
        hub.add_base(base_dir, name=BASE_NAME)
        make_catalog_adapter(work / "sql", 8, 16, ["q_proj", "v_proj"], seed=0)
        make_catalog_adapter(work / "chat", 4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=1)
        hub.add_adapter(work / "sql", name="sql-r8", tags=["sql"], description="Text to SQL <b>bold</b>")
        hub.add_adapter(
            work / "chat", name="chat-r4", tags=["chat"], description="<script>alert('desc')</script>"
        )
        hub.add_adapter(make_kohya(work / "anime.safetensors"), name="anime-style", tags=["style"])
        hub.combine([("sql-r8", 0.5), ("chat-r4", 0.5)], name="mix", tags=["sql", "chat"], device="cpu")
        hub.merge(BASE_NAME, [("sql-r8", 1.0)], out=work / "merged", device="cpu")
        alice = create_token(hub, "alice", write=True).token
        bob = create_token(hub, "bob", write=True).token
        names = sorted(a.name for a in hub.list_adapters())
    return names, alice, bob


def fill_repos(site: Site) -> None:
    """alice pushes sql-r8 (a public repo and a push record) and keeps a private repo; bob hosts a hostile card."""
    import huggingface_hub
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        huggingface_hub.utils.disable_progress_bars()
        with Hub(site.home) as hub:
            hub.push_adapter("sql-r8", "alice/sql-r8", endpoint=site.url, token=site.alice)
        api = huggingface_hub.HfApi(endpoint=site.url)
        api.create_repo("alice/secret-notes", private=True, token=site.alice)
        api.upload_file(
            path_or_fileobj=png(), path_in_repo="plot.png", repo_id="alice/secret-notes", token=site.alice
        )
        api.upload_file(
            path_or_fileobj=SECRET.encode(),
            path_in_repo="README.md",
            repo_id="alice/secret-notes",
            token=site.alice,
        )
        api.create_repo("bob/hostile", token=site.bob)
        api.upload_file(
            path_or_fileobj=HOSTILE.encode(), path_in_repo="README.md", repo_id="bob/hostile", token=site.bob
        )
        api.create_tag("bob/hostile", tag="v1", token=site.bob)
        api.upload_file(
            path_or_fileobj=b"<script>alert(1)</script>",
            path_in_repo="page.html",
            repo_id="bob/hostile",
            token=site.bob,
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("pages")
    home = work / "home"
    names, alice, bob = build_home(home, work)
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ADAPTERHUB_HOME", "ADAPTERHUB_DB")
    }
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_pages_server.py"), str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the pages server did not start: {proc.stderr.read() if proc.stderr else ''}")
    s = Site(line.strip(), home, alice, bob, names, proc)
    try:
        fill_repos(s)
        with Hub(home) as hub:
            s.sha = {n: hub.adapter_info(n).sha256 for n in names}
        yield s
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        assert alice not in err and bob not in err, "a token reached the server's log"


# ---------------------------------------------------------------------- plain HTTP


def test_every_page_has_a_strict_csp_and_the_api_still_answers(site: Site) -> None:
    for path in ("/", "/adapters/sql-r8", "/alice/sql-r8", "/login", "/nobody/nothing"):
        _, h, _ = site.get(path)
        assert "default-src 'self'" in h["Content-Security-Policy"], path
        assert "script-src 'self'" in h["Content-Security-Policy"]
        assert h["X-Content-Type-Options"] == "nosniff" and h["X-Frame-Options"] == "DENY"
    status, h, body = site.send(urllib.request.Request(site.url + "/adapters/sql-r8", method="HEAD"))
    assert status == 200 and body == "" and h["Content-Type"].startswith("text/html")
    status, h, body = site.get("/static/app.js")
    assert status == 200 and h["Content-Type"].startswith("text/javascript")
    assert site.get("/static/../__init__.py")[0] == 404
    # the API is in front of the pages, the catch-all behind them
    status, _, body = site.get("/api/models/alice/sql-r8")
    assert status == 200 and json.loads(body)["id"] == "alice/sql-r8"
    status, h, body = site.get("/no/such/endpoint/here")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]


def test_values_are_escaped(site: Site) -> None:
    status, _, body = site.get("/bob/hostile")
    assert status == 200
    assert "<script>window" not in body and '<img src="x"' not in body and 'onerror="window' not in body
    assert "&lt;script&gt;window.__pwned = 'body'" in body
    assert "&lt;script&gt;window.__pwned = &#x27;front matter&#x27;&lt;/script&gt;" in body  # metadata box
    assert 'href="javascript:' not in body and "<img" not in body
    assert "[image: a picture]" in body
    for path in ("/", "/adapters/chat-r4"):
        body = site.get(path)[2]
        assert "<script>alert" not in body and "&lt;script&gt;alert(&#x27;desc&#x27;)&lt;/script&gt;" in body
        assert len(re.findall(r"<script\b", body)) == 1  # only the package's own script
    body = site.get("/?q=%3Cscript%3E&base=%22%3E%3Cb%3E")[2]
    assert 'value="&lt;script&gt;"' in body and "<b>" not in body


def test_login_sets_strict_httponly_cookies_and_forms_need_the_csrf_token(site: Site) -> None:
    _, headers, body = site.get("/login")
    csrf = csrf_of(headers, body)
    assert re.search(r"adapterhub_csrf=[^;]+;.*HttpOnly", headers["Set-Cookie"], re.I)
    assert "samesite=strict" in headers["Set-Cookie"].lower()
    jar = f"adapterhub_csrf={csrf}"
    form = {"csrf": csrf, "token": site.alice, "next": "/alice/secret-notes"}
    # refused: no token, a wrong token, no cookie, another site's form
    for bad_form, cookie, extra in (
        ({**form, "csrf": ""}, jar, {}),
        ({**form, "csrf": "x" * 43}, jar, {}),
        (form, None, {}),
        (form, jar, {"Origin": "http://evil.example"}),
    ):
        status, h, page = site.post("/login", bad_form, cookie=cookie, headers=extra)
        assert status == 403, (bad_form, cookie, extra)
        assert "adapterhub_session" not in (h.get("Set-Cookie") or "")
    status, h, _ = site.post("/login", {**form, "token": "hf_not_a_token"}, cookie=jar)
    assert status == 401
    status, h, _ = site.post("/login", form, cookie=jar)
    assert status == 303 and h["Location"] == "/alice/secret-notes"
    session = [c for c in h.get_all("Set-Cookie") if c.startswith("adapterhub_session=")][0].lower()
    assert "httponly" in session and "samesite=strict" in session and "path=/" in session
    # an open redirect is not possible
    status, h, _ = site.post("/login", {**form, "next": "//evil.example/"}, cookie=jar)
    assert h["Location"] == "/"
    # logout needs the token as well
    cookie = site.login_cookie(site.alice)
    status, _, _ = site.post("/logout", {}, cookie=cookie)
    assert status == 403
    assert "Signed in as" in site.get("/", cookie=cookie)[2]
    csrf = re.search(r"adapterhub_csrf=([^;]+)", cookie).group(1)  # type: ignore[union-attr]
    status, h, _ = site.post("/logout", {"csrf": csrf}, cookie=cookie)
    assert status == 303 and 'adapterhub_session=""' in h["Set-Cookie"]


def test_private_repos_are_absent_without_a_login_that_may_read_them(site: Site) -> None:
    alice, bob = site.login_cookie(site.alice), site.login_cookie(site.bob)
    for cookie in (None, bob, "adapterhub_session=not-a-token"):
        assert "secret-notes" not in site.get("/", cookie=cookie)[2]
        assert "secret-notes" not in site.get("/?q=secret", cookie=cookie)[2]
        status, _, body = site.get("/alice/secret-notes", cookie=cookie)
        assert status == 404 and "Secret card" not in body
        assert site.get("/alice/no-such-repo", cookie=cookie)[0] == 404
    assert "alice/secret-notes" in site.get("/", cookie=alice)[2]
    status, _, body = site.get("/alice/secret-notes", cookie=alice)
    assert status == 200 and "<h1>Secret card</h1>" in body and "private" in body
    assert "--token $HF_TOKEN" in body  # the snippet says a token is needed


def test_private_catalog_adapters_are_shown_only_to_who_may_read_them(site: Site, tmp_path: Path) -> None:
    """A cataloged adapter tagged ``private`` (the rule the inference API follows) is not in the index,
    its rows, total or facets, has no page, and is not named as another adapter's child, unless the login
    may read it: ``owner/...`` its owner, a name without a namespace any token of the server."""
    from helpers.adapters import make_catalog_adapter

    make_catalog_adapter(tmp_path / "hidden", 4, 8, ["q_proj"], seed=5)
    make_catalog_adapter(tmp_path / "shared", 4, 8, ["v_proj"], seed=6)
    with Hub(site.home) as hub:
        hub.add_adapter(
            tmp_path / "hidden",
            name="alice/hidden-r4",
            tags=["private", "secretproject"],
            description="alice keeps this to herself",
        )
        hub.add_adapter(tmp_path / "shared", name="shared-private", tags=["private"])
        hub.combine(
            [("sql-r8", 0.5), ("alice/hidden-r4", 0.5)],
            name="alice/secret-mix",
            tags=["private"],
            device="cpu",
        )
    private = ("alice/hidden-r4", "shared-private", "alice/secret-mix")
    try:
        alice, bob = site.login_cookie(site.alice), site.login_cookie(site.bob)
        total = len(site.names)
        for cookie in (None, "adapterhub_session=not-a-token"):
            body = site.get("/", cookie=cookie)[2]
            assert not any(n in body for n in private) and "secretproject" not in body
            assert f'Catalog <span class="count">{total}</span>' in body
            assert "hidden-r4" not in site.get("/?q=hidden", cookie=cookie)[2]
            assert "No cataloged adapter matches" in site.get("/?tag=private", cookie=cookie)[2]
            for name in private:
                status, _, page = site.get(f"/adapters/{name}", cookie=cookie)
                assert status == 404 and "keeps this to herself" not in page
            status, _, page = site.get("/adapters/sql-r8", cookie=cookie)
            assert status == 200 and "secret-mix" not in page and "hidden-r4" not in page
        body = site.get("/", cookie=bob)[2]  # bob: the un-namespaced one, not alice's
        assert "shared-private" in body and "alice/hidden-r4" not in body and "secret-mix" not in body
        assert f'Catalog <span class="count">{total + 1}</span>' in body
        assert site.get("/adapters/shared-private", cookie=bob)[0] == 200
        assert site.get("/adapters/alice/hidden-r4", cookie=bob)[0] == 404
        body = site.get("/", cookie=alice)[2]
        assert all(n in body for n in private) and f'Catalog <span class="count">{total + 3}</span>' in body
        status, _, page = site.get("/adapters/alice/hidden-r4", cookie=alice)
        assert status == 200 and "keeps this to herself" in page
        assert "alice/secret-mix" in site.get("/adapters/sql-r8", cookie=alice)[2]
    finally:
        with Hub(site.home) as hub:
            hub.remove_adapters(["alice/secret-mix"])
            hub.remove_adapters(["alice/hidden-r4", "shared-private"])


def test_repo_files_are_served_to_whoever_may_read_them_and_never_run(site: Site) -> None:
    alice = site.login_cookie(site.alice)
    for cookie in (None, site.login_cookie(site.bob)):
        assert site.get("/alice/secret-notes/raw/plot.png", cookie=cookie)[0] == 404
    status, h, _ = site.get("/alice/secret-notes/raw/plot.png", cookie=alice)
    assert status == 200 and h["Content-Type"] == "image/png" and "sandbox" in h["Content-Security-Policy"]
    body = site.get("/alice/secret-notes", cookie=alice)[2]
    assert '<img src="/alice/secret-notes/raw/plot.png?rev=main" alt="the plot"' in body
    assert 'href="/alice/secret-notes/raw/plot.png?rev=main"' in body
    status, h, data = site.get("/bob/hostile/raw/page.html?rev=v1")
    assert status == 404  # not at the tag v1, which came before it
    status, h, data = site.get("/bob/hostile/raw/page.html")
    assert status == 200 and h["Content-Type"] == "application/octet-stream"
    assert h["Content-Disposition"].startswith("attachment") and h["X-Content-Type-Options"] == "nosniff"
    assert h["Content-Security-Policy"] == "default-src 'none'; sandbox"


def test_index_filters_sorts_and_paginates(site: Site) -> None:
    def rows(path: str) -> list[str]:
        return re.findall(r'<th scope="row"><a href="/adapters/([^"]+)">', site.get(path)[2])

    assert rows("/") == site.names
    assert rows("/?q=sql") == ["mix", "sql-r8"]
    assert rows("/?format=kohya") == ["anime-style"]
    assert rows("/?tag=chat") == ["chat-r4", "mix"]
    assert rows("/?target=k_proj") == ["chat-r4", "mix"]
    assert rows("/?min_rank=8&format=peft") == ["mix", "sql-r8"]
    assert rows("/?max_rank=4&format=peft") == ["chat-r4"]
    assert rows("/?sort=rank&order=desc")[0] in ("mix", "sql-r8")
    assert rows("/?sort=name&order=desc") == site.names[::-1]
    body = site.get("/?min_rank=lots")[2]
    assert "min_rank must be a whole number" in body and rows("/?min_rank=lots") == site.names


def test_pagination(site: Site) -> None:
    from adapterhub.server.pages.index import link
    from adapterhub.server.pages.listing import Query

    pages = [
        re.findall(r'<th scope="row"><a href="/adapters/([^"]+)">', site.get(f"/?per_page=1&page={n}")[2])
        for n in (1, 2, 3, 4)
    ]
    assert [n for page in pages for n in page] == site.names
    body = site.get("/?per_page=1&page=2")[2]
    assert "Adapters 2–2 of 4" in body and 'aria-current="page" href="/?page=2&amp;per_page=1"' in body
    assert 'rel="prev" href="/?per_page=1"' in body and 'rel="next" href="/?page=3&amp;per_page=1"' in body
    assert "Adapters 4–4 of 4" in site.get("/?per_page=1&page=99")[2]  # past the end: the last page
    assert 'rel="next"' not in site.get("/?per_page=10")[2]
    # the pager's links keep every filter and leave defaults out
    assert (
        link(Query(q="sql", tag="chat", per_page=10, page=3), page=4) == "/?q=sql&tag=chat&page=4&per_page=10"
    )
    assert link(Query()) == "/"


def test_adapter_page_and_cached_spectra_match_a_dense_svd(site: Site) -> None:
    import torch

    status, _, body = site.get("/adapters/sql-r8")
    assert status == 200
    assert body.count("<code>model.layers.") >= 4  # the modules table (and the spectra table)
    assert "alice/sql-r8" in body and "merged into" in body and 'href="/adapters/mix"' in body
    assert '<span class="ok">fits</span>' in body
    assert site.get("/adapters/anime-style")[2].count('<span class="bad">does not fit</span>') == 1
    cached = site.home / "cache" / "spectra" / f"{site.sha['sql-r8']}.json"
    doc = json.loads(cached.read_text())
    with Hub(site.home) as hub:
        weights = hub.load_adapter("sql-r8")
    assert len(doc["modules"]) == len(weights.modules) == 4
    for m in doc["modules"]:
        mod = weights.modules[m["module"] + ".weight"]
        assert mod.A is not None and mod.B is not None
        dense = torch.linalg.svdvals(mod.scale * mod.B.double() @ mod.A.double())[: mod.rank]
        assert torch.allclose(torch.tensor(m["sigma"], dtype=torch.float64), dense, rtol=1e-6, atol=1e-9)
        assert m["energy"][-1] == pytest.approx(1.0) and 1 <= m["effective_rank"] <= mod.rank
    assert site.get("/adapters/no-such-adapter")[0] == 404


@pytest.fixture
def trained(site: Site, tmp_path: Path) -> Iterator[list[str]]:
    """For one test: ``tuned`` (made by `Runtime.create` / `save` on the site's base: its lineage parent
    is the base), ``deep`` (12 layers, for the module order) and ``alice/tuned-private`` (tagged private)."""
    from helpers.adapters import BASE_NAME
    from helpers.models import make_adapter as make
    from helpers.models import tiny_llama as build
    from transformers import AutoModelForCausalLM

    added = ["tuned", "deep", "alice/tuned-private"]
    with Hub(site.home) as hub:
        base = hub.base_info(BASE_NAME)
        model = AutoModelForCausalLM.from_pretrained(str(base.path))
        rt = hub.attach(model)
        rt.create("tuned", rank=4, targets=["q_proj", "v_proj"], seed=3)
        rt.save("tuned", description="trained here")
        rt.freeze("tuned")
        rt.create("alice/tuned-private", rank=2, targets=["v_proj"], seed=4)
        rt.save("alice/tuned-private", tags=["private"])
        rt.detach()
        deep = make(build(0, num_hidden_layers=12), tmp_path / "deep", target_modules=["q_proj"])
        hub.add_adapter(deep, name="deep")
    try:
        yield added
    finally:
        with Hub(site.home) as hub:
            hub.remove_adapters(added)


def test_a_trained_adapter_links_its_base_page_and_modules_sort_by_number(
    site: Site, trained: list[str]
) -> None:
    """Issue 28, items 4 and 10: the base of a trained adapter is linked to its page (``/bases/NAME``: its
    config, size and the adapters that fit it, private ones only for who may see them), never to
    ``/adapters/NAME``; the modules table sorts layer 2 before layer 10."""
    status, _, body = site.get("/adapters/tuned")
    assert status == 200
    assert 'href="/bases/tiny-llama"' in body and 'href="/adapters/tiny-llama"' not in body
    assert '<dt>Base model</dt><dd><a href="/bases/tiny-llama">tiny-llama</a></dd>' in body
    status, _, page = site.get("/bases/tiny-llama")
    assert status == 200 and "<h1>tiny-llama</h1>" in page
    assert "<dt>Model type</dt><dd>llama</dd>" in page and "<code>hidden_size</code>" in page
    fitting = re.findall(r'<a href="/adapters/([^"]+)">', page)
    assert fitting == ["chat-r4", "mix", "sql-r8", "tuned"]  # not the kohya one, nor 12 layers, nor private
    alice = site.login_cookie(site.alice)
    assert "alice/tuned-private" in re.findall(
        r'<a href="/adapters/([^"]+)">', site.get("/bases/tiny-llama", cookie=alice)[2]
    )
    assert site.get("/bases/no-such-base")[0] == 404
    body = site.get("/adapters/deep")[2]
    modules = body.split('id="mod-h"', 1)[1].split("</section>", 1)[0]
    layers = [int(n) for n in re.findall(r"<code>[\w.]*?layers\.(\d+)\.", modules)]
    assert layers == list(range(12)), layers


# ---------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("ADAPTERHUB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ADAPTERHUB_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
    ]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    root = Path(os.environ.get("ADAPTERHUB_ARTIFACTS") or tempfile.gettempdir()) / "adapterhub-pages"
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class Tab:
    page: Any
    requests: list[str]
    errors: list[str]
    dialogs: list[str]


@pytest.fixture
def tab(browser: Any, site: Site) -> Iterator[Tab]:
    """A fresh browser context; every request, console error and dialog is recorded and checked after."""
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=site.url)
    page = context.new_page()
    t = Tab(page, [], [], [])
    page.on("request", lambda r: t.requests.append(r.url))
    page.on(
        "console",
        lambda m: t.errors.append(f"{m.text} ({m.location.get('url')})") if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: t.errors.append(str(e)))

    def on_dialog(d: Any) -> None:
        t.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    yield t
    context.close()
    hosts = {urlsplit(u).hostname for u in t.requests}
    assert hosts <= {"127.0.0.1"}, t.requests
    assert t.errors == []
    assert t.dialogs == []


def shot(t: Tab, artifacts: Path, name: str, *, full_page: bool = False) -> None:
    path = artifacts / f"{name}.png"
    t.page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("ADAPTERHUB_DOCS_IMG") == "1" and name in ("index", "adapter"):
        dest = HERE.parent / "docs" / "img" / f"{name}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def row_names(t: Tab) -> list[str]:
    return [s.strip() for s in t.page.locator("#adapters tbody tr:visible th a").all_inner_texts()]


def test_search_and_filter_in_the_browser(tab: Tab, site: Site, artifacts: Path) -> None:
    p = tab.page
    p.goto("/")
    assert row_names(tab) == site.names
    shot(tab, artifacts, "index")
    p.get_by_role("searchbox", name="Search").fill(
        "sq"
    )  # the script narrows the rows on the page while typing
    expect(p.locator("#adapters tbody tr.dim")).to_have_count(2)
    assert row_names(tab) == ["mix", "sql-r8"]
    p.get_by_role("searchbox", name="Search").press("Enter")  # the server searches
    p.wait_for_url("**/?q=sq*")
    assert row_names(tab) == ["mix", "sql-r8"]
    with p.expect_navigation():
        p.get_by_label("Tag").select_option("chat")  # a select applies the form at once
    assert "tag=chat" in p.url and row_names(tab) == ["mix"]
    p.goto("/")
    p.get_by_label("from").fill("8")
    p.get_by_label("Target module").fill("q_proj")
    p.get_by_role("button", name="Apply").click()
    p.wait_for_url("**min_rank=8**")
    assert row_names(tab) == ["mix", "sql-r8"]
    p.get_by_role("link", name="Rank", exact=True).click()
    p.wait_for_url("**sort=rank**")
    assert p.locator("th[aria-sort=ascending]").inner_text().startswith("Rank")
    # keyboard: the skip link is the first stop and leads to the content
    p.keyboard.press("Tab")
    assert p.evaluate("document.activeElement.textContent") == "Skip to content"


def test_adapter_page_in_the_browser(tab: Tab, site: Site, artifacts: Path) -> None:
    p = tab.page
    p.goto("/")
    p.get_by_role("link", name="sql-r8", exact=True).click()
    p.wait_for_url("**/adapters/sql-r8")
    assert p.get_by_role("heading", level=1).inner_text() == "sql-r8"
    modules = p.locator("table.modules tbody tr")
    assert modules.count() == 4
    first = modules.first.locator("td").all_inner_texts()
    assert first[1:5] == ["linear", "32", "32", "8"]  # kind, in, out, rank
    lineage = p.locator("svg.lineage")
    assert lineage.is_visible()
    assert lineage.locator("a.node[href='/adapters/mix']").count() == 1
    assert lineage.locator(".node.merge").count() == 1 and lineage.locator(".node.push").count() == 1
    assert lineage.locator("a.node.push[href='/alice/sql-r8']").count() == 1
    plot = p.locator("#energy-plot")
    assert plot.is_visible() and plot.locator("polyline.curve").count() == 4
    assert p.locator("table.spectra svg.spark").count() == 4
    p.get_by_label("Highlight a module").select_option(index=2)  # the script unhides it and highlights
    assert plot.locator("polyline.curve.hi").count() == 1
    shot(tab, artifacts, "adapter", full_page=True)
    lineage.locator("a.node[href='/adapters/mix']").click()
    p.wait_for_url("**/adapters/mix")
    assert p.locator("svg.lineage a.node[href='/adapters/sql-r8']").count() == 1
    shot(tab, artifacts, "adapter-mix")


def test_the_base_page_in_the_browser(tab: Tab, site: Site, trained: list[str], artifacts: Path) -> None:
    p = tab.page
    p.goto("/adapters/tuned")
    assert p.locator("svg.lineage a.node[href='/bases/tiny-llama']").count() == 1
    p.locator(".adapter-meta").get_by_role("link", name="tiny-llama").click()
    p.wait_for_url("**/bases/tiny-llama")
    assert p.get_by_role("heading", level=1).inner_text() == "tiny-llama"
    fits = p.locator("table.fits tbody tr th a, table.fits tbody tr td:first-child a")
    assert fits.all_inner_texts() == ["chat-r4", "mix", "sql-r8", "tuned"]
    assert p.locator("table.config").is_visible()
    shot(tab, artifacts, "base", full_page=True)
    p.get_by_role("link", name="tuned", exact=True).click()
    p.wait_for_url("**/adapters/tuned")
    assert p.get_by_role("heading", level=1).inner_text() == "tuned"


def test_login_and_logout_around_a_private_repo(tab: Tab, site: Site, artifacts: Path) -> None:
    p = tab.page
    p.goto("/")
    assert p.get_by_role("link", name="alice/secret-notes").count() == 0
    response = p.goto("/alice/secret-notes")
    assert response is not None and response.status == 404
    assert [e for e in tab.errors if "404" in e and e.endswith("/alice/secret-notes)")] == tab.errors
    tab.errors.clear()  # the browser logs the 404 this test asked for
    p.get_by_role("link", name="Log in").click()
    p.get_by_label("Access token").fill(site.alice)
    p.get_by_role("button", name="Log in").click()
    p.wait_for_url("**/alice/secret-notes")
    assert p.get_by_role("heading", name="Secret card").is_visible()
    assert p.locator("article.card img").evaluate("img => img.complete && img.naturalWidth") == 2
    shot(tab, artifacts, "private-repo")
    cookies = {c["name"]: c for c in p.context.cookies()}
    assert cookies["adapterhub_session"]["httpOnly"] and cookies["adapterhub_session"]["sameSite"] == "Strict"
    assert p.evaluate("document.cookie") == ""  # scripts cannot read the token
    p.goto("/")
    assert p.get_by_role("link", name="alice/secret-notes").count() == 1
    p.get_by_role("button", name="Log out").click()
    p.wait_for_url(site.url + "/")
    assert p.get_by_role("link", name="alice/secret-notes").count() == 0
    assert "adapterhub_session" not in {c["name"] for c in p.context.cookies()}


def test_a_hostile_card_is_inert(tab: Tab, site: Site, artifacts: Path) -> None:
    p = tab.page
    p.goto("/bob/hostile")
    assert p.evaluate("typeof window.__pwned") == "undefined"
    assert p.locator("main script, main img, main [onerror]").count() == 0
    assert "<script>window.__pwned = 'body'" in p.locator("article.card").inner_text()
    assert "<script>" in p.locator("aside.card-meta").inner_text()
    assert p.get_by_role("link", name="a link").count() == 0  # a javascript: link is left as text
    assert p.get_by_role("link", name="v1").count() == 1  # tags are listed
    snippet = p.locator("figure.snippet code").nth(2).inner_text()
    assert 'PeftModel.from_pretrained(base, "bob/hostile")' in snippet and site.url in snippet
    shot(tab, artifacts, "repo")


def test_pages_read_and_filter_without_javascript(browser: Any, site: Site) -> None:
    context = browser.new_context(java_script_enabled=False, base_url=site.url)
    p = context.new_page()
    requests: list[str] = []
    p.on("request", lambda r: requests.append(r.url))
    try:
        p.goto("/")
        p.get_by_label("Format").select_option("kohya")  # no script: nothing happens until Apply
        assert "format=" not in p.url
        p.get_by_role("button", name="Apply").click()
        p.wait_for_url("**format=kohya**")
        assert [t.strip() for t in p.locator("#adapters tbody th a").all_inner_texts()] == ["anime-style"]
        p.goto("/adapters/sql-r8")
        assert p.locator("svg.lineage").is_visible() and p.locator("#energy-plot polyline").count() == 4
        assert p.locator("#hl-label").is_hidden()  # the highlighter needs the script, so it stays hidden
        assert p.locator("figure.snippet button").count() == 0
    finally:
        context.close()
    assert {urlsplit(u).hostname for u in requests} <= {"127.0.0.1"}
