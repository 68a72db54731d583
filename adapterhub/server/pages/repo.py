"""``/{owner}/{name}``: a hosted repo as the Hub shows a model: its card, metadata, files with sizes and
sha256, commits, branches and tags, and snippets to use it from this server. A repo the caller may not
read is absent, exactly as in the API."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ...errors import RevisionNotFoundError
from ...records import human_size
from ..checks import is_name
from ..deps import may_read
from ..records import Commit, Entry, Ref, Repo, TokenInfo
from .html import Safe, join, render, table, when
from .markdown import metadata_box, render_markdown, split_card
from .state import store_of

COMMITS_SHOWN = 50
README_LIMIT = 1024 * 1024


def snippets(endpoint: str, repo: Repo, base: str | None, private: bool) -> Safe:
    rid = repo.repo_id
    token_cli = " --token $HF_TOKEN" if private else ""
    token_py = ", token=True" if private else ""
    cli = f"adapterhub pull {rid} --endpoint {endpoint}{token_cli}"
    hf = (
        f'from huggingface_hub import snapshot_download\n\npath = snapshot_download("{rid}", '
        f'endpoint="{endpoint}"{token_py})'
    )
    peft = (
        "import os\n\n"
        f'os.environ["HF_ENDPOINT"] = "{endpoint}"  # before importing transformers and peft\n\n'
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}")\n'
        f'model = PeftModel.from_pretrained(base, "{rid}"{token_py})'
    )
    blocks = join(
        render(
            '<figure class="snippet"><figcaption>{t}</figcaption><pre><code>{c}</code></pre></figure>',
            t=t,
            c=c,
        )
        for t, c in (("adapterhub", cli), ("huggingface_hub", hf), ("PEFT", peft))
    )
    return render(
        '<section aria-labelledby="use-h"><h2 id="use-h">Use this adapter</h2>{b}</section>', b=blocks
    )


def files_table(repo: Repo, rev: str, files: dict[str, Entry]) -> Safe:
    rows = []
    for e in files.values():
        href = f"/{quote(repo.repo_id, safe='/')}/raw/{quote(e.path, safe='/')}?{urlencode({'rev': rev})}"
        rows.append(
            (
                render(
                    '<a href="{h}">{p}</a>{lfs}',
                    h=href,
                    p=e.path,
                    lfs=Safe(' <span class="badge">LFS</span>' if e.lfs else ""),
                ),
                render('<span class="num">{s}</span>', s=human_size(e.size)),
                render('<code class="hash">{h}</code>', h=e.sha256),
            )
        )
    return table(f"{len(files)} files at {rev}", ("Path", "Size", "sha256"), rows)


def refs_list(repo: Repo, refs: list[Ref], current: str) -> Safe:
    def item(r: Ref) -> Safe:
        href = f"/{quote(repo.repo_id, safe='/')}" + (
            "" if r.name == "main" and r.kind == "branch" else "?" + urlencode({"rev": r.name})
        )
        cur = Safe(' aria-current="page"' if r.name == current else "")
        return render(
            '<li><a href="{h}"{cur}>{n}</a> <code>{o}</code></li>',
            h=href,
            cur=cur,
            n=r.name,
            o=r.commit_oid[:10],
        )

    branches = join(item(r) for r in refs if r.kind == "branch")
    tags = join(item(r) for r in refs if r.kind == "tag") or Safe("<li>none</li>")
    return render(
        '<section aria-labelledby="refs-h"><h2 id="refs-h">Branches and tags</h2><div class="cols">'
        "<div><h3>Branches</h3><ul>{b}</ul></div><div><h3>Tags</h3><ul>{t}</ul></div></div></section>",
        b=branches,
        t=tags,
    )


def commits_table(commits: list[Commit]) -> Safe:
    rows = [
        (render("<code>{o}</code>", o=c.oid[:10]), c.title, c.author or "", when(c.created_at))
        for c in commits
    ]
    return render(
        '<section aria-labelledby="commits-h"><h2 id="commits-h">Commits</h2>{t}</section>',
        t=table(f"Latest {len(commits)} commits", ("Commit", "Title", "Author", "When"), rows),
    )


def load_repo(
    request: Request, owner: str, name: str, rev: str, user: TokenInfo | None
) -> dict[str, object] | None:
    """Everything the page shows, read in one worker thread; None when the caller may not see the repo."""
    if not is_name(owner) or not is_name(name):
        return None
    store = store_of(request)
    repo = store.repos.get_repo(owner, name)
    if repo is None or not may_read(repo, user):
        return None
    try:
        head = store.repos.resolve(repo, rev)
    except RevisionNotFoundError:
        return {"repo": repo, "missing_rev": rev}
    files = store.repos.files(head)
    readme = ""
    if "README.md" in files:
        with store.blobs.path(files["README.md"].sha256).open("rb") as fh:
            readme = fh.read(README_LIMIT).decode("utf-8", errors="replace")
    return {
        "repo": repo,
        "head": head,
        "files": files,
        "readme": readme,
        "refs": store.repos.refs(repo),
        "commits": store.repos.history(repo, head, limit=COMMITS_SHOWN),
    }


async def repo_body(
    request: Request, owner: str, name: str, user: TokenInfo | None
) -> tuple[str, Safe] | None:
    rev = request.query_params.get("rev", "main")[:200] or "main"
    data = await run_in_threadpool(load_repo, request, owner, name, rev, user)
    if data is None:
        return None
    repo = data["repo"]
    assert isinstance(repo, Repo)
    badge = Safe(' <span class="badge">private</span>' if repo.private else "")
    if "missing_rev" in data:
        body = render(
            '<h1>{rid}{badge}</h1><p class="notice">No branch, tag or commit {rev} in this repo.</p>',
            rid=repo.repo_id,
            badge=badge,
            rev=rev,
        )
        return repo.repo_id, body
    head, files, readme = data["head"], data["files"], data["readme"]
    assert isinstance(head, Commit) and isinstance(files, dict) and isinstance(readme, str)
    refs, commits = data["refs"], data["commits"]
    assert isinstance(refs, list) and isinstance(commits, list)
    card = head.card or {}
    base = card.get("base_model")
    base = str(base[0] if isinstance(base, list) and base else base) if base else None
    endpoint = str(request.base_url).rstrip("/")
    card_html = (
        render(
            '<article class="card markdown" aria-label="Model card">{c}</article>',
            c=render_markdown(split_card(readme), raw=f"/{quote(repo.repo_id, safe='/')}/raw/", rev=rev),
        )
        if readme.strip()
        else Safe('<p class="muted">This repo has no README.md.</p>')
    )
    body = render(
        '<h1>{rid}{badge}</h1><p class="muted">At <code>{rev}</code> · commit <code>{oid}</code> · {when}</p>'
        '<div class="repo">{card}{meta}</div>{use}<section aria-labelledby="files-h"><h2 id="files-h">Files</h2>'
        "{files}</section>{refs}{commits}",
        rid=repo.repo_id,
        badge=badge,
        rev=rev,
        oid=head.oid[:10],
        when=when(head.created_at),
        card=card_html,
        meta=metadata_box(head.card),
        use=snippets(endpoint, repo, base, repo.private),
        files=files_table(repo, rev, files),
        refs=refs_list(repo, refs, rev),
        commits=commits_table(commits),
    )
    return repo.repo_id, body
