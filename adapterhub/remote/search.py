"""Search a Hub for adapter repos (`HfApi.list_models` with the ``peft`` library filter)."""

from __future__ import annotations

from .client import hub_client, resolve_endpoint
from .results import RemoteAdapter


def search_hub(
    query: str | None,
    *,
    base: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    limit: int = 50,
) -> list[RemoteAdapter]:
    url = resolve_endpoint(endpoint)
    with hub_client(url, what="model search") as _hf:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=url, token=token)
        filters = ["peft"]
        if base:
            filters.append(f"base_model:adapter:{base}")
        out = []
        for m in api.list_models(search=query or None, filter=filters, limit=limit):
            tags = tuple(m.tags or ())
            bases = [t.split(":", 2)[2] for t in tags if t.startswith("base_model:adapter:")]
            card = m.card_data.to_dict() if m.card_data is not None else {}
            base_model = bases[0] if bases else card.get("base_model")
            out.append(
                RemoteAdapter(
                    repo_id=m.id,
                    base_model=base_model if isinstance(base_model, str) else None,
                    tags=tuple(t for t in tags if not t.startswith("base_model:")),
                    private=bool(m.private),
                    last_modified=m.last_modified.isoformat() if m.last_modified else None,
                    downloads=m.downloads,
                    likes=m.likes,
                    sha=m.sha,
                )
            )
        return out
