"""`Hub`: the Python API, a facade over a `Library` (catalog + store) and the services that use it.

Every CLI command is one call here (but ``serve`` and ``token``, which call `adapterhub.server` with a
Hub), and every method here is one call into `adapterhub.services` or `adapterhub.remote`; they return frozen dataclasses from `records` (and the result
types of `ops`, `remote`) and raise the errors of `errors`. Nothing heavy is imported until a method needs
it: ``Hub()`` itself opens nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .home import default_home
from .records import AdapterFilter, finite
from .services import adapters as adapter_service
from .services import bases, bulk, compute, maintenance, recipes, running

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .catalog import Catalog
    from .catalog.library import Library
    from .compose import ComposeResult
    from .formats import AdapterFiles
    from .lora import LoraWeights
    from .ops.combine import AdapterExpr
    from .ops.merge import MergeResult
    from .ops.validate import BaseLayout, ValidationReport
    from .records import (
        AdapterInfo,
        BaseInfo,
        BulkAddResult,
        BulkItem,
        CheckReport,
        EvaluationRecord,
        FilterKeywords,
        GcReport,
        Generation,
        MergeRecord,
        PushRecord,
    )
    from .remote.results import PullResult, PushResult, RemoteAdapter
    from .runtime import Runtime
    from .services.compute import CombineOptions, CombineSummary, ExtractOptions, Progress, Weighted
    from .services.evaluation import EvaluationResult, RankedAdapter
    from .services.mixing import MixResult
    from .services.train_plan import MemoryPlan
    from .services.training import StepCallback, TrainResult
    from .store import BlobStore

__all__ = ["Hub", "default_home"]


class Hub:
    """A catalog of adapters in one home folder (or one database URL)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *, db: str | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.db_url = db or os.environ.get("ADAPTERHUB_DB") or None
        self._library: Library | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def library(self) -> Library:
        """The catalog and store this Hub works on."""
        if self._library is None:
            from .catalog.library import Library

            self._library = Library(self.home, db=self.db_url)
        return self._library

    @property
    def catalog(self) -> Catalog:
        return self.library.catalog

    @property
    def store(self) -> BlobStore:
        return self.library.store

    @property
    def created_home(self) -> bool:
        """True when this Hub made a new, empty catalog (a mistyped ``--home`` does that)."""
        return self._library is not None and self._library.created_home

    def close(self) -> None:
        if self._library is not None:
            self._library.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upgrade_db(self) -> str:
        """Apply pending catalog migrations (also done on open); returns the schema revision."""
        return self.catalog.upgrade()

    def db_revision(self) -> str | None:
        return self.catalog.revision()

    def check_db(self, *, verify: bool = True) -> CheckReport:
        """Every row's files present and (with ``verify``) matching their sha256; objects no row references;
        leftovers of killed runs; values JSON cannot hold; the database's own integrity check. Writes nothing."""
        return maintenance.check(self.library, verify=verify)

    def gc(self, *, dry_run: bool = True) -> GcReport:
        """Remove store objects no row references and what dead runs left behind; a dry run by default."""
        return maintenance.gc(self.library, dry_run=dry_run)

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        base: str | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
        allow_pickle: bool = False,
        source: str | None = None,
        progress: Progress | None = None,
    ) -> AdapterInfo:
        """Check an adapter, copy its files into the store and catalog it, all or nothing;
        ``progress(bytes_done, bytes_total)`` follows the copy of the weights."""
        return adapter_service.add_adapter(
            self.library, path, name=name, base=base, tags=tags, description=description,
            allow_pickle=allow_pickle, source=source, progress=progress,
        )  # fmt: skip

    def add_tree(
        self,
        root: str | os.PathLike[str],
        *,
        base: str | None = None,
        tags: Sequence[str] = (),
        allow_pickle: bool = False,
        on_item: Callable[[BulkItem], None] | None = None,
    ) -> BulkAddResult:
        """Catalog every adapter under a folder tree (PEFT folders, kohya files), each named by its path
        below ``root``; each is added, skipped (name taken) or reported as failed with its reason."""
        return bulk.add_tree(
            self.library, root, base=base, tags=tags, allow_pickle=allow_pickle, on_item=on_item
        )

    def add_hf_cache(
        self,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        tags: Sequence[str] = (),
        on_item: Callable[[BulkItem], None] | None = None,
    ) -> BulkAddResult:
        """Catalog the LoRA adapters in the Hugging Face cache (``$HF_HUB_CACHE``), named ``owner/name``."""
        return bulk.add_hf_cache(self.library, cache_dir=cache_dir, tags=tags, on_item=on_item)

    def list_adapters(
        self,
        *,
        compatible_with: str | None = None,
        **filters: Unpack[FilterKeywords],
    ) -> list[AdapterInfo]:
        """Cataloged adapters, filtered; ``compatible_with`` keeps those whose every target fits that
        base (a registered name or a checkpoint folder), judged from the catalog alone."""
        where = AdapterFilter(**filters)
        return self.library.select(None, where, names=self._fitting(compatible_with))

    def search_adapters(
        self,
        query: str,
        *,
        compatible_with: str | None = None,
        **filters: Unpack[FilterKeywords],
    ) -> list[AdapterInfo]:
        """Adapters whose name, description, tags or base model contain every word of ``query``,
        filtered as by `list_adapters`."""
        where = AdapterFilter(**filters)
        return self.library.select(query, where, names=self._fitting(compatible_with))

    def adapter_records_json(
        self,
        query: str | None = None,
        *,
        compatible_with: str | None = None,
        **filters: Unpack[FilterKeywords],
    ) -> list[str]:
        """`list_adapters` / `search_adapters` as JSON text, one `AdapterInfo.to_dict()` record each.

        On SQLite the database writes the JSON itself, which keeps `adapterhub list --json` fast on
        large catalogs; on other backends it is `json.dumps` of each record.
        """
        where = AdapterFilter(**filters)
        names = self._fitting(compatible_with)
        fast = self.library.select_json(query, where, names=names)
        if fast is not None:
            return fast
        found = self.library.select(query, where, names=names)
        return [json.dumps(finite(a.to_dict()), ensure_ascii=False, allow_nan=False) for a in found]

    def _fitting(self, base: str | None) -> set[str] | None:
        return None if base is None else self.compatible_names(base)

    def adapter_info(self, name: str) -> AdapterInfo:
        """One adapter with its files, modules, merges, children and pushes."""
        return self.library.info(name)

    def adapter_files(self, name: str) -> AdapterFiles:
        """The stored files of a cataloged adapter, as `AdapterFiles` pointing into the store."""
        return self.library.files(name)

    def load_adapter(self, name: str) -> LoraWeights:
        """A cataloged adapter with its tensors loaded."""
        return adapter_service.load_adapter(self.library, name)

    def tag_adapter(self, name: str, tags: Sequence[str], *, remove: bool = False) -> AdapterInfo:
        """Add (or with ``remove``, take away) tags."""
        from .names import check_tags

        self.library.tag(name, check_tags(tags), remove=remove)
        return self.library.info(name)

    def remove_adapter(self, name: str) -> None:
        self.library.remove([name])

    def remove_adapters(self, names: Sequence[str]) -> list[str]:
        """Remove adapters (all or none) and the stored files no other adapter uses."""
        return self.library.remove(names)

    def export_adapter(
        self,
        name: str,
        dest: str | os.PathLike[str],
        *,
        format: str | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> Path:
        """Write a cataloged adapter out: a PEFT folder or a kohya ``.safetensors`` file. In its own format
        the stored files are copied byte for byte; ``overwrite`` replaces only an earlier export."""
        return adapter_service.export_adapter(
            self.library, name, dest, format=format, overwrite=overwrite, progress=progress
        )

    # ------------------------------------------------------------------ bases and validation
    def add_base(
        self, path: str | os.PathLike[str], *, name: str | None = None, hub_id: str | None = None
    ) -> BaseInfo:
        """Register a base checkpoint folder (headers only). ``hub_id``: its real id, which exports name as
        the base of adapters trained on it (default: config.json's ``_name_or_path`` if it is a repo id)."""
        return bases.add_base(self.library, path, name=name, hub_id=hub_id)

    def import_gguf(
        self, gguf: str | os.PathLike[str], *, name: str, **options: Unpack[bases.GgufOptions]
    ) -> BaseInfo:
        """Dequantize a GGUF checkpoint (llama.cpp / ollama) into a checkpoint with its tokenizer under
        ``HOME/bases/`` and register it as base ``name`` (``options``: dtype, hub_id, progress)."""
        return bases.import_gguf(self.library, gguf, name=name, **options)

    def list_bases(self) -> list[BaseInfo]:
        return self.library.bases()

    def base_info(self, name: str) -> BaseInfo:
        return bases.base_info(self.library, name)

    def remove_base(self, name: str) -> None:
        bases.remove_base(self.library, name)

    def base_layout(self, base: str | os.PathLike[str]) -> BaseLayout:
        """A registered base by name, else a checkpoint folder read from its headers."""
        return bases.base_layout(self.library, base)

    def validate(
        self,
        target: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        with_: Sequence[str | os.PathLike[str]] = (),
        scan_values: bool = True,
        for_: str | None = None,
        max_lora_rank: int | None = None,
        progress: Progress | None = None,
    ) -> ValidationReport:
        """Check an adapter (cataloged name or path): integrity, fit to ``base``, fit with ``with_``, what
        ``for_="vllm"`` would refuse. Nothing is written. ``report.ok`` is False when any check is an error."""
        return bases.validate(self.library, target, base=base, with_=with_, scan_values=scan_values,
                              for_=for_, max_lora_rank=max_lora_rank, progress=progress)  # fmt: skip

    def validate_catalog(
        self, *, base: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> list[ValidationReport]:
        """Check cataloged adapters against a base from the catalog's module rows alone."""
        return bases.validate_catalog(self.library, base=base, names=names)

    def compatible_names(self, base: str | os.PathLike[str]) -> set[str]:
        """Names of the cataloged adapters that fit ``base``."""
        return bases.compatible_names(self.library, base)

    def merges_of(self, name: str) -> list[MergeRecord]:
        """Where a cataloged adapter was merged (base, output folder, weight, when)."""
        return self.library.merges_of(name)

    # ------------------------------------------------------------------ compute
    def adapter(self, name: str) -> AdapterExpr[str]:
        """A cataloged adapter as a value for arithmetic: ``0.7 * hub.adapter("sql") + 0.3 * hub.adapter("chat")``."""
        return compute.adapter(self.library, name)

    def merge(
        self,
        base: str | os.PathLike[str],
        adapters: Sequence[Weighted] | AdapterExpr[Any],
        *,
        out: str | os.PathLike[str],
        dtype: str = "keep",
        device: str = "auto",
        unmerge: bool = False,
        progress: Progress | None = None,
    ) -> MergeResult:
        """Fold adapters into a base checkpoint (registered name or folder), writing ``out``:
        ``W0 + sum_i w_i * s_i * B_i A_i`` per targeted tensor, in fp32, rounded once. Checked first;
        on any problem nothing is written. Recorded in the catalog (`adapter_info(...).merges`)."""
        return compute.merge(
            self.library, base, adapters, out=out, dtype=dtype, device=device, unmerge=unmerge, progress=progress
        )  # fmt: skip

    def combine(
        self, adapters: Sequence[Weighted] | AdapterExpr[Any], *, name: str, **options: Unpack[CombineOptions]
    ) -> CombineSummary:
        """Combine adapters (``[("sql", 0.7), ("chat", 0.3)]`` or an `adapter` expression) into a new
        cataloged adapter ``name`` with its lineage; ``options`` (method, rank, keep, density, seed, device,
        tags, base, ...) as `adapterhub.services.compute.combine` documents them."""
        return compute.combine(self.library, adapters, name=name, **options)

    def resize_adapter(
        self,
        name: str,
        *,
        rank: int | str,
        new_name: str,
        keep: float = 0.99,
        device: str = "auto",
        tags: Sequence[str] = (),
        description: str | None = None,
    ) -> CombineSummary:
        """The optimal rank-``rank`` (or ``"auto"`` with ``keep``) reduction of an adapter, cataloged as ``new_name``."""
        return compute.resize_adapter(
            self.library, name, rank=rank, new_name=new_name, keep=keep, device=device, tags=tags,
            description=description,
        )  # fmt: skip

    def extract_adapter(
        self,
        base: str | os.PathLike[str],
        finetuned: str | os.PathLike[str],
        *,
        rank: int | str,
        name: str,
        **options: Unpack[ExtractOptions],
    ) -> CombineSummary:
        """A LoRA from a full fine-tune: per matching 2-D weight, the truncated SVD of ``W_ft - W_base``
        (``options``: keep, max_rank, svd, device, tags, description, progress)."""
        return compute.extract_adapter(self.library, base, finetuned, rank=rank, name=name, **options)

    def compose(
        self, recipe: str | os.PathLike[str] | dict[str, Any], *, dry_run: bool = False, device: str = "auto"
    ) -> ComposeResult:
        """Run a recipe (`schemas/recipe.schema.json`) step by step, everything checkable checked first;
        a recipe leaves all of its outputs or none."""
        return recipes.compose(self.library, recipe, dry_run=dry_run, device=device)

    # ------------------------------------------------------------------ running
    def load_base(self, base: str | os.PathLike[str], *, device: str | None = None, dtype: str = "auto",
                  quantize: str | None = None) -> tuple[Any, Any]:  # fmt: skip
        """(transformers model, tokenizer) of a registered base or checkpoint folder, on ``device``
        (default: CUDA when there is one): a causal LM, or an encoder for embedding models. ``quantize``
        ``"nf4"`` or ``"int8"`` loads its linear layers through bitsandbytes (QLoRA's 4-bit base);
        ``"nf4-all"`` also its input embedding and output layer (NF4). The tokenizer is ``None`` when the folder has no tokenizer files."""
        return running.load_base(self.library, base, device=device, dtype=dtype, quantize=quantize)

    def attach(self, model: Any, *, dtype: Any = None) -> Runtime:
        """A runtime on a live model whose ``load`` also takes catalog names (keyed by the store's sha256):
        ``rt = hub.attach(model); rt.load("sql"); rt.activate("sql")``. See `adapterhub.runtime`."""
        return running.attach(self.library, model, dtype=dtype)

    def generate(
        self,
        base: str | os.PathLike[str],
        prompt: str,
        *,
        adapters: Sequence[tuple[str, float]] = (),
        system: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        device: str | None = None,
        on_text: Callable[[str], None] | None = None,
        server: str | None = None,
        token: str | None = None,
        quantize: str | None = None,
    ) -> Generation:
        """Answer ``prompt`` with a causal-LM base and the chat template, ``adapters`` active (several:
        their exact weighted combination); ``on_text`` streams the text as it comes. With ``server``
        (the URL of ``adapterhub serve --model``, or any OpenAI-compatible server) the server answers."""
        if server is not None:
            from .remote.inference import chat

            return chat(
                server, str(base), adapters, prompt, system=system, max_tokens=max_tokens, temperature=temperature,
                seed=seed, token=token, on_text=on_text,
            )  # fmt: skip
        return running.generate_text(
            self.library, base, prompt, adapters=adapters, system=system, max_tokens=max_tokens,
            temperature=temperature, seed=seed, device=device, on_text=on_text, quantize=quantize,
        )  # fmt: skip

    def embed(
        self,
        base: str | os.PathLike[str],
        texts: Sequence[str],
        *,
        adapters: Sequence[tuple[str, float]] = (),
        device: str | None = None,
        server: str | None = None,
        token: str | None = None,
    ) -> list[list[float]]:
        """Sentence embeddings of ``texts`` from an encoder base (MiniLM, say), ``adapters`` active."""
        if server is not None:
            from .remote import inference

            return inference.embeddings(
                server, inference.model_field(str(base), adapters), texts, token=token
            )
        return running.embed_texts(self.library, base, texts, adapters=adapters, device=device)

    def train(self, base: str | os.PathLike[str], data: str | os.PathLike[str], *, name: str, device: str | None = None,
              tags: Sequence[str] = (), description: str | None = None, resume: bool = False, nproc: int = 1,
              log_every: int = 10, on_step: StepCallback | None = None,
              on_log: Callable[[dict[str, Any]], None] | None = None,
              on_plan: Callable[[MemoryPlan], None] | None = None, **options: Any) -> TrainResult:  # fmt: skip
        """Train a new LoRA adapter ``name`` on a causal-LM base from JSONL ``data`` and catalog it with its
        lineage (`adapterhub.services.training`). ``options``: ``rank``, ``alpha``, ``targets``, ``steps`` or
        ``epochs``, ``lr``, ``batch_size`` (global), ``max_length``, ``init``, ``seed``, ``schedule``, ``warmup``,
        ``max_grad_norm``, ``grad_accum``, ``gradient_checkpointing``, ``optim``, ``bf16``, ``eval_data`` or
        ``eval_fraction``, ``eval_every``, ``save_every``, ``group_by_length``, ``packing`` (rows of ``max_length``
        tokens, each example attending only to itself), ``quantize`` (nf4|nf4-all|int8), ``fsdp`` (``--fsdp``:
        with ``nproc`` >= 2, FSDP2 shards the base and the factors over the processes)."""
        from .services.training import train

        return train(
            self.library, base, data, name=name, device=device, tags=tags, description=description, resume=resume,
            nproc=nproc, log_every=log_every, on_step=on_step, on_log=on_log, on_plan=on_plan, **options,
        )  # fmt: skip

    def plan_training(
        self, base: str | os.PathLike[str], *, nproc: int = 1, device: str | None = None, **options: Any
    ) -> MemoryPlan:
        """The memory plan of a `train` run with these options, from the base's config alone."""
        from .services.training import plan

        return plan(self.library, base, nproc=nproc, device=device, **options)

    # ------------------------------------------------------------------ sharing
    def push_adapter(
        self,
        name: str,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        message: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        progress: bool = False,
    ) -> PushResult:
        """Upload a cataloged adapter to ``repo_id`` (created if missing): its PEFT files, a model card and
        ``adapterhub.json``. An unchanged adapter makes no new commit. The push is recorded.

        ``endpoint`` defaults to ``$HF_ENDPOINT``, else huggingface.co; ``token`` to ``$HF_TOKEN``, else
        huggingface_hub's stored login.
        """
        from .remote.push import push_adapter

        return push_adapter(
            self.library, name, repo_id, private=private, revision=revision, message=message, endpoint=endpoint,
            token=token, progress=progress,
        )  # fmt: skip

    def pull_adapter(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        name: str | None = None,
        endpoint: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        progress: bool = False,
        tags: Sequence[str] = (),
    ) -> PullResult:
        """Download an adapter from ``repo_id`` (``"user/repo"`` or ``"user/repo@revision"``), check every
        file against the server's hashes, validate it and catalog it with source ``repo@commit`` (and
        ``tags`` besides the repo's own, in the same write). ``token=False`` sends no token at all (not even
        ``HF_TOKEN``'s). Pulling a commit that is already cataloged is a no-op."""
        from .remote.pull import pull_adapter

        spec = repo_id if revision is None else f"{repo_id.split('@', 1)[0]}@{revision}"
        return pull_adapter(self.library, spec, name=name, endpoint=endpoint, token=token,
                            allow_pickle=allow_pickle, progress=progress, tags=tags)  # fmt: skip

    def search_hub(
        self,
        query: str | None = None,
        *,
        base: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        limit: int = 50,
    ) -> list[RemoteAdapter]:
        """Adapter repos on a Hub: PEFT models whose id matches ``query``, optionally for one base model."""
        from .remote.search import search_hub

        return search_hub(query, base=base, endpoint=endpoint, token=token, limit=limit)

    def adapter_pushes(self, name: str) -> list[PushRecord]:
        """Where and at which commit an adapter was pushed, oldest first."""
        return self.library.pushes_of(name)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, adapters: Sequence[str], **options: Any) -> EvaluationResult:
        """The base alone, each cataloged adapter and each combination (``"a:0.7+b:0.3"``) scored on JSONL
        ``data`` in one pass of mixed batches, kept as evaluation records; ``options`` (base, data, metrics,
        combinations, max_tokens, limit, dataset, seed, device, record) as `services.evaluation.evaluate`."""
        from .services.evaluation import evaluate

        return evaluate(self.library, adapters, **options)

    def evaluations(self, adapter: str | None = None, **filters: Any) -> list[EvaluationRecord]:
        """Evaluation records, oldest first: those of one adapter (by content), filtered by dataset, metric, base."""
        from .services.evaluation import evaluations

        return evaluations(self.library, adapter, **filters)

    def rank_adapters(self, sort: str, **filters: Unpack[FilterKeywords]) -> list[RankedAdapter]:
        """`list_adapters`, best first by the latest ``DATASET:METRIC`` record (``"qa:loss"``)."""
        from .services.evaluation import parse_sort, rank_adapters

        parse_sort(sort)
        return rank_adapters(self.library, self.list_adapters(**filters), sort)

    def mix(self, adapters: Sequence[str], **options: Any) -> MixResult:
        """Learn the weights of an exact combination minimizing the loss on ``data`` (factors frozen) and catalog
        it as ``name`` with lineage and evaluation; ``options`` (base, data, name, steps, lr, rank, search, ...)."""
        from .services.mixing import mix

        return mix(self.library, adapters, **options)
