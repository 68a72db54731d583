"""`TimedH11`: uvicorn's h11 protocol with a deadline for each request's head. uvicorn has none: a client
that opens a connection and sends half a request line (or nothing) would be held forever."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT", "TimedH11"]

logger = logging.getLogger(__name__)

#: seconds a client has to send a request's head (its request line and headers)
HEADER_TIMEOUT = 30.0


class TimedH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive within
    `HEADER_TIMEOUT` seconds (counted from the connection, or from the first byte of a later request)."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            logger.info(
                "%s: no complete request head within %.0f s; closed", self.client, self.header_timeout
            )
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
