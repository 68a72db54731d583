"""`Refusal`: a request refused, in OpenAI's error shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Refusal"]


@dataclass(frozen=True)
class Refusal:
    """A request refused, in OpenAI's error shape."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
