"""`AdapterHubCallback`: a transformers ``TrainerCallback`` that catalogs the PEFT adapter a ``Trainer``
(or TRL's ``SFTTrainer``, which is one) trains, with its lineage.

    trainer = SFTTrainer(model, args=..., train_dataset=..., peft_config=LoraConfig(...),
                         callbacks=[AdapterHubCallback(hub, name="pirate", base="smollm2")])

At the end of training (and with ``every_checkpoint=True`` at each checkpoint the trainer saves, as
``NAME-step-N``) the adapter is written from the model and cataloged through `Library.ingest`: one
lineage row ``method: train`` from the base (``base``: a registered base's name; else the registered
base the model was loaded from, matched by folder) with the steps, the training losses the trainer
logged, the last eval loss, the hyperparameters of ``TrainingArguments``, the trainer's class and, when
``data`` names the training file, its sha256. Only the main process catalogs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..errors import AdapterExistsError, InvalidOptionError
from ..names import check_name, check_tags

if TYPE_CHECKING:
    from ..hub import Hub
    from ..records import AdapterInfo

__all__ = ["AdapterHubCallback"]

HYPERPARAMETERS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "lr_scheduler_type",
    "max_grad_norm",
    "optim",
    "seed",
    "weight_decay",
    "bf16",
    "gradient_checkpointing",
)


def _sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class AdapterHubCallback(TrainerCallback):
    """Catalog the trained adapter as ``name`` in ``hub`` (see the module)."""

    def __init__(
        self,
        hub: Hub,
        *,
        name: str,
        base: str | None = None,
        data: str | os.PathLike[str] | None = None,
        every_checkpoint: bool = False,
        tags: Sequence[str] = (),
        description: str | None = None,
    ) -> None:
        check_name(name)
        self.hub, self.name, self.base = hub, name, base
        self.tags, self.description = check_tags(tags), description
        self.every_checkpoint = every_checkpoint
        self.data_sha256 = _sha256(data) if data is not None else None
        if hub.library.exists(name):
            raise AdapterExistsError(name)
        if base is not None and not hub.library.bases(base):
            raise InvalidOptionError(
                f"no base model named {base!r} is registered; `adapterhub base list` shows them"
            )
        self.cataloged: list[AdapterInfo] = []
        self._trainer_class = "Trainer"

    # -------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import inspect

        for frame in inspect.stack()[1:6]:  # the Trainer subclass that runs (SFTTrainer, ...)
            owner = frame.frame.f_locals.get("self")
            if owner is not None and type(owner).__name__.endswith("Trainer"):
                self._trainer_class = f"{type(owner).__module__.split('.')[0]}.{type(owner).__name__}"
                break

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every_checkpoint and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._catalog(f"{self.name}-step-{state.global_step}", kwargs.get("model"), args, state, folder)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._catalog(self.name, kwargs.get("model"), args, state, None)

    # -------------------------------------------------------------- cataloging
    def _catalog(self, name: str, model: Any, args: Any, state: Any, folder: Path | None) -> None:
        from ..formats import read_adapter
        from ..services.running import saver

        if model is None or not hasattr(model, "peft_config"):
            raise InvalidOptionError(
                "AdapterHubCallback catalogs PEFT adapters; the trainer's model is no PeftModel"
            )
        base_model = model.get_base_model()
        with tempfile.TemporaryDirectory() as tmp:
            src = folder if folder is not None and (folder / "adapter_config.json").is_file() else Path(tmp)
            if src == Path(tmp):
                model.save_pretrained(tmp)
            weights = read_adapter(src, load=True)
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        evals = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
        lineage = {
            "steps": state.global_step,
            "loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "losses": losses,
            "eval_loss": evals[-1] if evals else None,
            "data_sha256": self.data_sha256,
            "trainer": self._trainer_class,
            "hyperparameters": {k: _plain(getattr(args, k, None)) for k in HYPERPARAMETERS},
        }
        save = saver(self.hub.library, base_model, base=self.base)
        self.cataloged.append(
            save(name, weights, tags=self.tags, description=self.description, lineage=lineage)
        )


def _plain(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
