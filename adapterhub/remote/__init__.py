"""Sharing: push to and pull from the Hugging Face Hub or any Hub-compatible server, search it, and the
model cards that go with pushed adapters. Importing this package does not import huggingface_hub."""

from __future__ import annotations

from ..records import PushRecord
from .results import NewToken, PullResult, PushResult, RemoteAdapter

__all__ = ["NewToken", "PullResult", "PushRecord", "PushResult", "RemoteAdapter"]
