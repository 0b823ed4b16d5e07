"""The null delivery API: the contract's success answer, and nothing kept.

An HTTP/1.1 server on asyncio (uvloop when importable) with keep-alive.
A request's body (``Content-Length`` bytes) is counted and dropped, and
the answer is ``201 {"id": "<id>"}``, the id being a per-process random
prefix and a counter in base 36 (URL-safe, unique).  It costs the relay's
forwarder a real HTTP round trip but next to nothing on the other side, so
that what a run measures is the relay.

With ``--hash`` it keeps each request's body, takes the ``message`` part
of the multipart body apart, and hashes the message's body (what follows
its header section) with SHA-256: ``GET /stats`` shows the last digest, so
that scenario 5 can check that 50 MB arrived byte for byte.  ``GET
/stats`` always answers the request count and bytes received.

    python -m bench.nullapi --port 8099 [--hash]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import re
from types import ModuleType
from typing import Any

uvloop: ModuleType | None
try:  # pragma: no cover - depends on the environment
    uvloop = importlib.import_module("uvloop")
except ImportError:  # pragma: no cover
    uvloop = None

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_MAX_HEAD = 64 * 1024
_BOUNDARY = re.compile(rb"boundary=\"?([^\";\s]+)", re.IGNORECASE)


def base36(n: int) -> str:
    out = []
    while True:
        n, r = divmod(n, 36)
        out.append(_DIGITS[r])
        if not n:
            return "".join(reversed(out))


class State:
    """Shared by every connection of the process."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.prefix = os.urandom(5).hex()
        self.counter = 0
        self.bytes = 0
        self.last_digest: str | None = None
        self.last_size: int | None = None
        self.last_error: str | None = None

    def next_id(self) -> bytes:
        self.counter += 1
        return f'{{"id":"{self.prefix}-{base36(self.counter)}"}}'.encode()

    def take_message(self, content_type: bytes, body: bytes) -> None:
        """Hash the body of the ``message`` part (after its header section)."""
        m = _BOUNDARY.search(content_type)
        if m is None:
            self.last_error = "no boundary"
            return
        delimiter = b"\r\n--" + m.group(1)
        part = body.find(b'name="message"')
        start = body.find(b"\r\n\r\n", part) + 4 if part >= 0 else -1
        end = body.rfind(delimiter + b"--")
        if part < 0 or start < 4 or end < start:
            self.last_error = "no message part"
            return
        message = memoryview(body)[start:end]
        head_end = body.find(b"\r\n\r\n", start, end)
        if head_end < 0:
            self.last_error = "message without a body"
            return
        self.last_digest = hashlib.sha256(message[head_end + 4 - start:]).hexdigest()
        self.last_size = end - (head_end + 4)
        self.last_error = None


class NullAPI(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.head = b""
        self.remaining = 0
        self.close_after = False
        self.content_type = b""
        self.kept: bytearray | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        while data:
            if self.remaining:
                n = len(data)
                if n <= self.remaining:
                    self.remaining -= n
                    self.state.bytes += n
                    if self.kept is not None:
                        self.kept += data
                    data = b""
                else:
                    take, data = data[:self.remaining], data[self.remaining:]
                    self.remaining = 0
                    self.state.bytes += len(take)
                    if self.kept is not None:
                        self.kept += take
                if not self.remaining:
                    self._answer_post()
                continue
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > _MAX_HEAD:
                    self._respond(b"431 Request Header Fields Too Large", b"{}", close=True)
                return
            head, data = self.head[:end], self.head[end + 4:]
            self.head = b""
            self._request(head)

    def _request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        method, _, rest = lines[0].partition(b" ")
        path = rest.partition(b" ")[0]
        length = 0
        self.close_after = False
        self.content_type = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                self.close_after = value.strip().lower() == b"close"
            elif name == b"content-type":
                self.content_type = value.strip()
            elif name == b"transfer-encoding":
                self._respond(b"411 Length Required", b'{"error":"chunked"}', close=True)
                return
        if method == b"GET" and path == b"/stats":
            s = self.state
            body = json.dumps({"requests": s.counter, "bytes": s.bytes,
                               "last_body_sha256": s.last_digest, "last_body_size": s.last_size,
                               "last_error": s.last_error}).encode()
            self._respond(b"200 OK", body)
            return
        if method != b"POST":
            self._respond(b"405 Method Not Allowed", b'{"error":"method"}')
            return
        self.kept = bytearray() if self.state.keep else None
        self.remaining = length
        if not length:
            self._answer_post()

    def _answer_post(self) -> None:
        if self.kept is not None:
            self.state.take_message(self.content_type, bytes(self.kept))
            self.kept = None
        self._respond(b"201 Created", self.state.next_id(), self.close_after)

    def _respond(self, status: bytes, body: bytes, close: bool = False) -> None:
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
        if close:
            self.transport.close()


async def serve(host: str, port: int, keep: bool) -> None:
    loop = asyncio.get_running_loop()
    state = State(keep)
    server = await loop.create_server(lambda: NullAPI(state), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.nullapi")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hash", action="store_true",
                   help="hash each message's body (for scenario 5: keeps the request in memory)")
    a = p.parse_args()
    coro = serve(a.host, a.port, a.hash)
    try:
        if uvloop is not None:
            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
