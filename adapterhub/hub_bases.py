"""`Hub` methods for base models and validation (mixed into `adapterhub.hub.Hub`)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._hubcore import HubCore
from .errors import AdapterHubError, AdapterNotFoundError, BaseModelError
from .records import BaseInfo

if TYPE_CHECKING:
    from .formats import AdapterFiles
    from .lora import LoraWeights
    from .ops.validate import BaseLayout, Check, ValidationReport


class BasesMixin(HubCore):
    # ------------------------------------------------------------------ base models
    def add_base(self, path: str | os.PathLike[str], *, name: str | None = None) -> BaseInfo:
        """Register a base checkpoint folder: tensor names, shapes and dtypes from its headers only."""
        from .catalog import bases
        from .formats.checkpoint import read_checkpoint
        from .hub import check_name

        ckpt = read_checkpoint(path)
        base_name = check_name(name if name is not None else Path(path).resolve().name)
        dtypes = Counter(info.dtype for _, info in ckpt.tensors.values())
        row = {
            "name": base_name,
            "path": str(Path(path).resolve()),
            "model_type": ckpt.model_type,
            "architectures": list(ckpt.architectures),
            "num_params": ckpt.num_params,
            "num_tensors": len(ckpt.tensors),
            "size_bytes": ckpt.total_bytes,
            "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
            "fingerprint": ckpt.fingerprint,
            "config": dict(ckpt.config) or None,
        }
        tensors = [(n, info.shape, info.dtype) for n, (_, info) in sorted(ckpt.tensors.items())]
        with self.catalog.write() as conn:
            if bases.find_base_id(conn, base_name) is not None:
                raise BaseModelError(
                    f"a base model named {base_name!r} is already registered; pick another --name or remove it first"
                )
            bases.insert_base(conn, row, tensors)
        return self.base_info(base_name)

    def list_bases(self) -> list[BaseInfo]:
        from .catalog import bases

        with self.catalog.read() as conn:
            return bases.select_bases(conn)

    def base_info(self, name: str) -> BaseInfo:
        from .catalog import bases

        with self.catalog.read() as conn:
            found = bases.select_bases(conn, name)
        if not found:
            raise BaseModelError(
                f"no base model named {name!r} is registered; `adapterhub base list` shows them"
            )
        return found[0]

    def remove_base(self, name: str) -> None:
        from .catalog import bases

        with self.catalog.write() as conn:
            base_id = bases.find_base_id(conn, name)
            if base_id is None:
                raise BaseModelError(
                    f"no base model named {name!r} is registered; `adapterhub base list` shows them"
                )
            bases.delete_base(conn, base_id)

    def base_layout(self, base: str | os.PathLike[str]) -> BaseLayout:
        """A registered base by name, else a checkpoint folder read from its headers."""
        from .catalog import bases
        from .catalog.queries import _json
        from .formats.checkpoint import read_checkpoint
        from .ops.validate import BaseLayout

        with self.catalog.read() as conn:
            found = bases.base_layout_rows(conn, str(base))
        if found is not None:
            r, shapes = found
            cfg = _json(r.config) or {}
            alias = cfg.get("_name_or_path")
            return BaseLayout(
                name=r.name,
                shapes=shapes,
                model_type=r.model_type,
                fingerprint=r.fingerprint,
                config=cfg,
                aliases=(alias,) if isinstance(alias, str) and alias else (),
            )
        if not Path(base).is_dir():
            raise BaseModelError(
                f"{base!s} is neither a registered base model nor a checkpoint folder; "
                "`adapterhub base list` shows the registered ones"
            )
        return BaseLayout.from_checkpoint(read_checkpoint(base))

    # ------------------------------------------------------------------ validation
    def _subject(
        self, target: str | os.PathLike[str]
    ) -> tuple[str, AdapterFiles | None, list[Check], str | None]:
        """(label, files, checks so far, declared base name) for a cataloged name or a path."""
        from .formats import detect
        from .ops.validate import Check

        name = str(target)
        cataloged = self._exists(name)
        if cataloged:
            info = self.adapter_info(name)
            checks: list[Check] = []
            for f in info.files or ():
                if not self.store.verify(f.sha256):
                    checks.append(
                        Check(
                            "error",
                            "store",
                            f"stored file {f.filename} is missing or does not match its sha256",
                        )
                    )
            if checks:
                return name, None, checks, info.base_model
            return (
                name,
                self.adapter_files(name),
                [Check("ok", "store", "stored files match their sha256")],
                info.base_model,
            )
        try:
            files = detect(target)
        except AdapterHubError as exc:
            if not Path(target).exists():
                raise AdapterNotFoundError(name) from None
            return name, None, [Check("error", "files", str(exc))], None
        return name, files, [], None

    def validate(
        self,
        target: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        with_: Sequence[str | os.PathLike[str]] = (),
        scan_values: bool = True,
    ) -> ValidationReport:
        """Check an adapter (cataloged name or path): integrity, fit to ``base``, fit with ``with_``.

        Nothing is written. ``report.ok`` is False when any check is an error.
        """
        from .ops.validate import ValidationReport, check_base, check_integrity, check_pair

        label, files, checks, declared = self._subject(target)
        weights: LoraWeights | None = None
        if files is not None:
            more, weights = check_integrity(files, scan_values=scan_values)
            checks += more
        base_label = None
        if base is not None:
            layout = self.base_layout(base)
            base_label = layout.name
            if weights is not None:
                checks += check_base(weights, layout, declared=declared)
        for other in with_:
            olabel, ofiles, ochecks, odeclared = self._subject(other)
            bad = [c for c in ochecks if c.status == "error"]
            if ofiles is None or bad:
                checks += [c.__class__(c.status, c.check, f"{olabel}: {c.message}", c.module) for c in bad]
                continue
            from .formats import read_adapter

            try:
                oweights = read_adapter(ofiles)
            except AdapterHubError as exc:
                from .ops.validate import Check

                checks.append(Check("error", "together.read", f"{olabel}: {exc}"))
                continue
            if weights is not None:
                checks += check_pair(
                    label, weights, olabel, oweights,
                    a_base=self._fingerprint_of(declared or weights.base_model),
                    b_base=self._fingerprint_of(odeclared or oweights.base_model),
                )  # fmt: skip
        return ValidationReport(
            subject=label, checks=tuple(checks), base=base_label, others=tuple(str(o) for o in with_)
        )

    def _fingerprint_of(self, model_name: str | None) -> str | None:
        from .catalog import bases

        with self.catalog.read() as conn:
            name = bases.base_for_model_name(conn, model_name)
            if name is None:
                return None
            return next((b.fingerprint for b in bases.select_bases(conn, name)), None)

    def validate_catalog(
        self, *, base: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> list[ValidationReport]:
        """Check cataloged adapters against a base from the catalog's module rows alone (no file is
        opened); the adapters' own integrity was checked when they were added."""
        from .catalog import bases
        from .ops.validate import ValidationReport, check_base, weights_from_modules

        layout = self.base_layout(base)
        with self.catalog.read() as conn:
            facts = bases.adapter_facts(conn, names)
        if names is not None:
            missing = sorted(set(names) - {f["name"] for f in facts})
            if missing:
                raise AdapterNotFoundError(missing[0])
        reports = []
        done: dict[Any, tuple[Check, ...]] = {}  # adapters with identical layouts are checked once
        for f in facts:
            fan = bool(f["config"].get("fan_in_fan_out"))
            repl = tuple(sorted((k, tuple(v)) for k, v in f["replacements"].items()))
            key = (f["format"], f["base_model"], fan, repl, f["modules"])
            if key not in done:
                w = weights_from_modules(
                    f["modules"], fmt=f["format"], config=f["config"], replacements=f["replacements"],
                    base_model=f["base_model"],
                )  # fmt: skip
                done[key] = tuple(check_base(w, layout))
            reports.append(ValidationReport(subject=f["name"], checks=done[key], base=layout.name))
        return reports

    def compatible_names(self, base: str | os.PathLike[str]) -> set[str]:
        return {r.subject for r in self.validate_catalog(base=base) if r.ok}

    def merges_of(self, name: str) -> list[dict[str, Any]]:
        """Where a cataloged adapter was merged (base, output folder, weight, when)."""
        from .catalog import bases

        with self.catalog.read() as conn:
            return bases.merges_of(conn, name)
