"""``/bases/{name}``: a registered base model: what it is (its real id when known, model type, size), its
config, and the cataloged adapters that fit it (those the viewer may see)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ...errors import AdapterHubError
from ...records import BaseInfo, human_size
from ..privacy import is_private, may_see
from ..records import TokenInfo
from .html import Safe, definition_list, number, render, table, when
from .state import hub_of

if TYPE_CHECKING:
    from ...hub import Hub

CONFIG_VALUE_CHARS = 300


def base_href(name: str) -> str:
    return "/bases/" + quote(name, safe="/")


def base_link(name: str) -> Safe:
    return render('<a href="{h}">{n}</a>', h=base_href(name), n=name)


def registered_base(bases: list[BaseInfo], declared: str | None) -> BaseInfo | None:
    """The registered base an adapter's declared base names: by its name, else by its real id."""
    if not declared:
        return None
    want = declared.strip().lower().rstrip("/")
    return next((b for b in bases if b.name.lower() == want), None) or next(
        (b for b in bases if b.hub_id and b.hub_id.lower() == want), None
    )


def _value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= CONFIG_VALUE_CHARS else text[:CONFIG_VALUE_CHARS] + " …"


def config_table(config: dict[str, Any]) -> Safe:
    """The config's top-level fields (transformers' private ``_...`` ones left out), by key."""
    rows = [
        (render("<code>{k}</code>", k=k), _value(v))
        for k, v in sorted(config.items())
        if not k.startswith("_")
    ]
    if not rows:
        return Safe('<p class="muted">The catalog holds no config for this base.</p>')
    return table("config.json", ("Field", "Value"), rows, css="grid config")


def adapters_table(records: list[dict[str, Any]]) -> Safe:
    if not records:
        return Safe('<p class="muted">No cataloged adapter fits this base.</p>')
    rows = [
        (
            render('<a href="/adapters/{h}">{n}</a>', h=quote(r["name"], safe="/"), n=r["name"]),
            r["format"],
            render('<span class="num">{v}</span>', v=r["rank"]),
            ", ".join(r.get("target_modules") or ()),
            r.get("base_model") or "",
        )
        for r in records
    ]
    return table(
        f"{len(records)} adapter{'s' * (len(records) != 1)}",
        ("Adapter", "Format", "Rank", "Targets", "Declared base"),
        rows,
        css="grid fits",
    )


def load(
    hub: Hub, name: str, user: TokenInfo | None
) -> tuple[BaseInfo, dict[str, Any], list[dict[str, Any]]] | None:
    """What the page shows, or None when no base ``name`` is registered."""
    info = next((b for b in hub.list_bases() if b.name == name), None)
    if info is None:
        return None
    try:
        config = dict(hub.base_layout(name).config)
    except AdapterHubError:
        config = {}
    records = [json.loads(r) for r in hub.adapter_records_json(compatible_with=name)]
    seen = [r for r in records if may_see(r["name"], is_private(r.get("tags")), user)]
    return info, config, sorted(seen, key=lambda r: r["name"].lower())


async def base_body(request: Request, name: str, user: TokenInfo | None) -> tuple[str, Safe] | None:
    found = await run_in_threadpool(load, hub_of(request), name, user)
    if found is None:
        return None
    info, config, fitting = found
    meta = definition_list(
        [
            ("Real id", info.hub_id),
            ("Model type", info.model_type),
            ("Architectures", ", ".join(info.architectures)),
            ("Parameters", number(info.num_params)),
            ("Tensors", number(info.num_tensors)),
            ("Size", human_size(info.size_bytes)),
            ("dtype", info.dtype),
            ("Registered", when(info.created_at)),
            ("Fingerprint", render('<code class="hash">{h}</code>', h=info.fingerprint)),
        ]
    )
    lead = (
        render("Base model <code>{i}</code>; exports name it so.", i=info.hub_id)
        if info.hub_id
        else Safe(
            "Base model, known here by its local name (<code>base add --hub-id</code> records its real id)."
        )
    )
    body = render(
        '<h1>{name}</h1><p class="lead">{lead}</p><div class="adapter-meta">{meta}</div>'
        '<section aria-labelledby="fit-h"><h2 id="fit-h">Adapters that fit it</h2>{fits}</section>'
        '<section aria-labelledby="cfg-h"><h2 id="cfg-h">Config</h2>{config}</section>',
        name=info.name,
        lead=lead,
        meta=meta,
        fits=adapters_table(fitting),
        config=config_table(config),
    )
    return info.name, body
