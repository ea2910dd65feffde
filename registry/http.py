"""uvicorn's h11 protocol with a request-receipt deadline (uvicorn has none: a slowloris client that
sends one header byte a second would hold its connection forever)."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_with_header_deadline(seconds: float) -> type[H11Protocol]:
    """An H11Protocol class that closes a connection whose request headers are not complete within
    ``seconds`` of the connection opening (or of the previous response, on keep-alive)."""

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the request line and headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def __getattr__(name: str) -> Any:
    # `loreg serve --workers N`: uvicorn builds each worker's config from an import string, and a
    # class made by protocol_with_header_deadline cannot travel to a spawned process; built on
    # demand here, with the deadline from that worker's settings (no work at import time)
    if name == "SettingsHeaderDeadlineProtocol":
        from loreg.registry.settings import Settings

        return protocol_with_header_deadline(Settings().header_timeout_s)
    raise AttributeError(name)
