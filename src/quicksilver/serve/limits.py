"""What a client may send, and how long it may take: the guards below the API.

- The request head (request line and headers) holds at most ``max_header_bytes``; a longer one
  is answered 414 (the request line alone is too long) or 431 (the headers are), and the rest
  of what the client sends is read and dropped for a moment, so that it reads the answer
  instead of a reset connection.
- The head arrives within ``read_timeout`` seconds of the connection opening (or of the last
  response): a slow client is answered 408 and dropped, an idle one dropped.
- The body arrives within ``read_timeout`` seconds too (408), and holds at most
  ``max_body_bytes`` (413, before any byte is read when ``Content-Length`` says so).

uvicorn (with h11) checks the head's size but answers 400 and closes at once, and times out
only idle keep-alive connections; ``GuardedH11Protocol`` adds the rest.
"""

from __future__ import annotations

import asyncio
import json
import socket

import h11
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from ..errors import QuicksilverError

LINGER_SECONDS = 2.0  # how long a refused client may go on sending before the connection closes


def error_object(message: str, type: str = "invalid_request_error") -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": None, "code": None}}


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response with OpenAI's error object, closing the connection."""
    body = json.dumps(error_object(message, "timeout_error" if status == 408 else "invalid_request_error")).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head and clear answers to oversized heads.

    ``read_timeout`` is set by ``uvicorn_options`` on a subclass of its own.
    """

    read_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._lingering = False
        self._new_head()

    def _new_head(self) -> None:
        """A request head may begin now: count its bytes and start its deadline."""
        self._head_bytes, self._line_seen = 0, False
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.read_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # a refused client still sending: drop it
            return
        reading_head = self.conn.their_state is h11.IDLE
        if reading_head:
            self._head_bytes += len(data)
            self._line_seen = self._line_seen or b"\n" in data
        super().data_received(data)
        if reading_head and self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()  # the head is complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._new_head()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # uvicorn calls this for a head h11 refuses
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if self._head_bytes > limit and not self._line_seen:
            answer = _raw_error(414, "URI Too Long", f"the request line is longer than {limit} bytes")
        elif self._head_bytes > limit:
            answer = _raw_error(431, "Request Header Fields Too Large", f"the request head is longer than {limit} bytes")
        else:
            answer = _raw_error(400, "Bad Request", "invalid HTTP request")
        self._refuse(answer)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes:
            self._refuse(_raw_error(408, "Request Timeout", f"the request head did not arrive within {self.read_timeout:g} s"))
        else:
            self.transport.close()

    def _refuse(self, answer: bytes) -> None:
        """Send ``answer``, then drop what the client still sends for a moment before closing.

        Closing with unread bytes would reset the connection, and the client would see a reset
        instead of the answer.
        """
        self._cancel_head_timer()
        self._lingering = True
        if self.cycle is not None and not self.cycle.response_complete:  # a body h11 refused mid-request:
            self.cycle.disconnected = True  # the app's request ends as if its client had gone
            self.cycle.message_event.set()
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


class BodyLimits:
    """ASGI middleware: a request body holds at most ``max_bytes`` (413) and arrives within ``timeout`` seconds (408).

    A ``Content-Length`` over the limit is answered at once, before any byte of the body is read
    (uvicorn drops the body as it arrives); a body without one is counted as it comes. The
    deadline holds only while the body is read: later ``receive`` calls (a disconnect watcher's)
    wait as long as they like.
    """

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def _too_large(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # No "connection: close": uvicorn then reads and drops the body, and the client, busy sending it, reads this answer.
            response = JSONResponse(error_object(self._too_large()), status_code=413)
            return await response(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout
        body_done, received = False, 0

        async def receive_within_limits():
            nonlocal body_done, received
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s",
                                    headers={"connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large())
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_within_limits, send)


def uvicorn_options(read_timeout: float, max_header_bytes: int, keep_alive: int) -> dict:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that apply these limits."""
    protocol = type("QuickSilverH11Protocol", (GuardedH11Protocol,), {"read_timeout": read_timeout})
    return {"http": protocol, "h11_max_incomplete_event_size": max_header_bytes, "timeout_keep_alive": keep_alive}


def check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (IPv6 when the host has a colon), so that a taken port or a
    bad address is a one-line error before the model loads, not a uvicorn traceback after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:  # gaierror too: an unknown host name
        raise QuicksilverError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
