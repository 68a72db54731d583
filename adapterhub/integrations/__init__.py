"""Bridges to the trainers users already run: `adapterhub.integrations.transformers.AdapterHubCallback`
catalogs what a transformers ``Trainer`` (or TRL's ``SFTTrainer``) trains."""

__all__: list[str] = []
