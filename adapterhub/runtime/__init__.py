"""Adapters on a live torch / transformers model: attach, hot-switch, per-row batches, merge in place.

```python
from adapterhub.runtime import attach

rt = attach(model)                       # hooks nothing until an adapter is loaded
rt.load("adapters/sql", name="sql")      # checked against the model first; refused with a report
rt.load("adapters/chat", name="chat")
rt.activate("sql")                       # or None (the base), or {"sql": 0.7, "chat": -0.3}
with rt.rows(["sql", "chat", None, {"sql": 0.5, "chat": 0.5}]):
    logits = model(input_ids).logits     # each row equals that row run alone with its spec
rt.merge("sql"); rt.unmerge()            # fp32, rounded once; unmerge is bit-exact
rt.detach()                              # the model is exactly as given

ad = rt.create("new", rank=8, targets=["q_proj", "v_proj"])   # trainable: A random, B = 0, base frozen
...                                      # train ad.parameters() with any optimizer
rt.save("new", path="adapters/new")      # a PEFT folder; rt.activate("new") serves it like a loaded one
```

Needs torch (and transformers only for GPT-2 ``Conv1D`` layers); no database, no catalog.
"""

from __future__ import annotations

from ._plan import content_sha256, model_layout
from ._residency import Residency
from .runtime import AdapterSpec, ResidentAdapter, Runtime, attach
from .table import RowTable
from .train import TrainableAdapter

__all__ = [
    "AdapterSpec",
    "Residency",
    "ResidentAdapter",
    "RowTable",
    "Runtime",
    "TrainableAdapter",
    "attach",
    "content_sha256",
    "model_layout",
]
