"""Evaluation results on the web pages: the adapter page's results, ``/leaderboard/{dataset}`` (sorted
by its header links, an SVG bar chart drawn on the server, private adapters' results hidden from who may
not see them) over plain HTTP and in Chromium (Debian's /usr/bin/chromium through Playwright)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_pages import CHROMIUM, Site

from adapterhub import Hub
from adapterhub.server.tokens import create_token
from adapterhub.services.evaluation import record_evaluation

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from helpers.adapters import BASE_NAME, make_catalog_adapter, tiny_llama

    work = tmp_path_factory.mktemp("evalpages")
    home = work / "home"
    tiny_llama().save_pretrained(str(work / "base"), safe_serialization=True)
    with Hub(home) as hub:
        hub.add_base(work / "base", name=BASE_NAME)
        for i, (name, tags) in enumerate([("sql", []), ("chat", []), ("alice/secret", ["private"])]):
            make_catalog_adapter(work / f"a{i}", 4, 8, ["q_proj", "v_proj"], seed=i)
            hub.add_adapter(work / f"a{i}", name=name, tags=tags)
        lib = hub.library
        common = {
            "base": BASE_NAME,
            "dataset": "qa<b>",
            "dataset_sha256": "ab" * 32,
            "rows": 64,
            "source": "eval",
        }
        record_evaluation(lib, None, values={"loss": 2.5, "exact": 0.1}, **common)  # type: ignore[arg-type]
        record_evaluation(lib, "sql", values={"loss": 1.9, "exact": 0.4}, **common)  # type: ignore[arg-type]
        record_evaluation(lib, "sql", values={"loss": 1.2, "exact": 0.5}, **common)  # type: ignore[arg-type]  # a rerun
        record_evaluation(lib, "chat", values={"loss": 1.5, "exact": 0.7}, **common)  # type: ignore[arg-type]
        record_evaluation(lib, "alice/secret", values={"loss": 0.3, "exact": 0.9}, **common)  # type: ignore[arg-type]
        record_evaluation(
            lib, None, values={"loss": 1.4}, combination={"sql": 0.5, "alice/secret": 0.5}, **common
        )  # type: ignore[arg-type]
        alice = create_token(hub, "alice").token
        # a run of a private adapter with its base reference row, on a dataset nobody else used
        hidden = {**common, "dataset": "alice-acquisition-target"}
        (secret,) = record_evaluation(lib, "alice/secret", values={"loss": 0.2}, **hidden)  # type: ignore[arg-type]
        from dataclasses import asdict

        from adapterhub.catalog.evaluations import FIELDS, insert_evaluations

        base_row = {k: v for k, v in asdict(secret).items() if k in FIELDS}  # the same run's base row
        base_row.update(subject="base", adapter_sha256=None, value=2.0)
        with lib.catalog.write() as conn:
            insert_evaluations(conn, [base_row])
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
    try:
        yield Site(line.strip(), home, alice, "", [], proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def _subjects(body: str) -> list[str]:
    table = body[body.index("id='leaderboard'") :]
    return [re.sub("<[^>]+>", "", m) for m in re.findall(r"<th scope='row'>(.*?)</th>", table)]


def test_leaderboard_over_http(site: Site) -> None:
    status, _, body = site.get("/leaderboard/qa%3Cb%3E")
    assert status == 200 and "<h1>Leaderboard: qa&lt;b&gt;</h1>" in body
    assert _subjects(body) == ["sql", "chat", "tiny-llama (base)"]  # latest per subject, lowest loss first
    assert "secret" not in body and '<svg class="bars"' in body and body.count("<rect") == 3
    status, _, body = site.get("/leaderboard/qa%3Cb%3E?metric=exact&sort=subject&order=desc")
    assert _subjects(body) == ["tiny-llama (base)", "sql", "chat"]
    assert 'aria-sort="descending"' in body
    cookie = site.login_cookie(site.alice)
    _, _, mine = site.get("/leaderboard/qa%3Cb%3E", cookie=cookie)
    assert _subjects(mine) == ["alice/secret", "sql", "sql:0.5+alice/secret:0.5", "chat", "tiny-llama (base)"]
    status, _, body = site.get("/adapters/sql")
    assert '<h2 id="res-h">Results</h2>' in body and "1.2" in body and "1.9" in body
    assert "/leaderboard/qa%3Cb%3E?metric=loss" in body
    _, _, body = site.get("/leaderboard")
    assert "qa&lt;b&gt;" in body and "secret" not in body
    assert site.get("/leaderboard/nothing")[0] == 404


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_leaderboard_in_the_browser(browser: Any, site: Site) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=site.url)
    page = context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto("/adapters/chat")
    page.get_by_role("link", name="qa<b>").first.click()  # the newest result: exact
    page.wait_for_url("**/leaderboard/**metric=exact")
    rows = page.locator("#leaderboard tbody th")
    assert rows.all_inner_texts() == ["chat", "sql", "tiny-llama (base)"]  # higher is better
    page.get_by_role("link", name="loss", exact=True).first.click()
    page.wait_for_url("**metric=loss")
    assert rows.all_inner_texts() == ["sql", "chat", "tiny-llama (base)"]  # lower is better
    bars = page.locator("svg.bars rect")
    assert bars.count() == 3 and page.locator("svg.bars").is_visible()
    widths = [float(bars.nth(i).get_attribute("width")) for i in range(3)]
    assert widths[2] == max(widths)  # the base's loss is the largest
    page.get_by_role("link", name="Subject", exact=True).click()
    page.wait_for_url("**sort=subject**")
    assert rows.all_inner_texts() == ["chat", "sql", "tiny-llama (base)"]
    page.get_by_role("link", name="Subject", exact=True).click()
    page.wait_for_url("**order=desc**")
    assert rows.all_inner_texts() == ["tiny-llama (base)", "sql", "chat"]
    page.get_by_role("link", name="sql", exact=True).click()
    page.wait_for_url("**/adapters/sql")
    assert page.locator("table.results tbody tr").count() == 4
    context.close()
    assert {urlsplit(u).hostname for u in requests} <= {"127.0.0.1"}
    assert errors == []


def test_a_private_evaluation_leaves_no_trace_on_the_leaderboards(site: Site) -> None:
    """An evaluation of a private adapter alone names its dataset nowhere for others (the review found
    ``/leaderboard`` listed the dataset, with the base row's value, rows and time)."""
    _, _, body = site.get("/leaderboard")
    assert "alice-acquisition-target" not in body
    assert site.get("/leaderboard/alice-acquisition-target")[0] == 404
    cookie = site.login_cookie(site.alice)
    _, _, mine = site.get("/leaderboard", cookie=cookie)
    assert "alice-acquisition-target" in mine
