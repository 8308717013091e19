"""How uvicorn serves the app: its HTTP/1.1 protocol with a deadline on each request head, and the keep-alive
and connection limits from the settings.

Uvicorn itself closes idle keep-alive connections, but a client that sends part of a request head and then
nothing more keeps its connection (and a slot of ``max_connections``) for ever. ``head_deadline_protocol``
closes such a connection ``header_timeout_s`` after it was opened or after its last response, unless a whole
request head arrived meanwhile."""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus the request-head deadline. ``head_timeout`` is set per server by
    ``head_deadline_protocol``."""

    head_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None
    _after = None  # the request cycle that was current when the deadline was armed

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._after:  # a new request head was parsed
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if self.transport is None or self.transport.is_closing():
            return
        self._after = self.cycle
        self._deadline = self.loop.call_later(self.head_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.cycle is self._after and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no whole request head in %g s", self.head_timeout)
            self.transport.close()


def head_deadline_protocol(head_timeout: float) -> type[HeadDeadlineProtocol]:
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": float(head_timeout)})


def uvicorn_options(settings) -> dict:
    """Keyword arguments of ``uvicorn.run`` for these settings."""
    return {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
            "http": head_deadline_protocol(settings.header_timeout_s),
            "timeout_keep_alive": settings.keep_alive_timeout_s,
            "limit_concurrency": settings.max_connections}
