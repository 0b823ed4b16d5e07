"""What one send costs the relay's process, step by step, in-process.

    python -m bench.sendcost            # the rules and the HTTP client's steps
    python -m bench.sendcost --post     # and a POST, treq's way and the Agent's

The rules: :func:`mxmrelay.rules.apply_rules` on typical header sections,
with the address reader's fast path (:mod:`mxmrelay.fastpath`) and with
the full reader alone.  The HTTP client: what treq does on every request
that never changes between requests (the URL encoded and its host
IDNA-checked, a cookie jar), and what the forwarder does itself.  With
``--post``: the client's CPU per POST of a 2 KB message to the null API
(``bench.nullapi``, a process of its own on the other core), through treq's
``HTTPClient.post`` and through the Agent it wraps (what the forwarder
does).  Microseconds per call, the best of three runs.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mxmrelay import addresses, rules
from mxmrelay.directory import CustomerSpace

SPACE = CustomerSpace("demo", "Demo", frozenset({"example.com"}))
ENVELOPE = rules.Envelope("app@example.com", ("someone@example.org",))
_REST = (b"Subject: Your order 1234\r\nMessage-ID: <1234.5678@shop.example.com>\r\n"
         b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n")
#: A name, the From and To values (after the colon), as clients write them.
HEADERS = [
    ("angle only", b" <app@example.com>", b" <someone@example.org>"),
    ("bare address", b" app@example.com", b" someone@example.org"),
    ("Name <address>", b" Shop <app@example.com>", b" Some One <someone@example.org>"),
    ("quoted name", b' "Shop, Inc." <app@example.com>', b' "One, Some" <someone@example.org>'),
    ("encoded word", b" =?utf-8?q?Caf=C3=A9?= <app@example.com>",
     b" =?utf-8?q?Ren=C3=A9e?= <someone@example.org>"),
    ("comment (full reader)", b" app@example.com (Shop)", b" someone@example.org (Some One)"),
    ("folded (full reader)", b" Shop\r\n <app@example.com>",
     b" Some One\r\n <someone@example.org>"),
]


def best(f: Callable[[], object], number: int) -> float:
    """Microseconds per call, the best of three runs."""
    return min(timeit.repeat(f, number=number, repeat=3)) / number * 1e6


@contextmanager
def full_reader() -> Iterator[None]:
    """The rules with the full address reader alone (as before the fast path)."""
    module: Any = rules
    names = ("mailboxes", "lone_mailbox", "display_name")
    saved = [getattr(module, name) for name in names]
    for name in names:
        setattr(module, name, getattr(addresses, name))
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(module, name, value)


def rules_table(number: int) -> list[str]:
    out = [f"{'header shape':24} {'fast path':>10} {'full reader':>12}   (us per apply_rules)"]
    for name, from_value, to_value in HEADERS:
        section = b"From:" + from_value + b"\r\nTo:" + to_value + b"\r\n" + _REST

        def call(section: bytes = section) -> object:
            result = rules.apply_rules(ENVELOPE, section, SPACE, send_id="01hx",
                                       bounce_template="b+{id}@x.test", received=b"Received: x")
            assert isinstance(result, rules.Send), result
            return result

        fast = best(call, number)
        with full_reader():
            full = best(call, number)
        out.append(f"{name:24} {fast:10.1f} {full:12.1f}")
    return out


def client_steps(number: int) -> list[str]:
    from hyperlink import EncodedURL
    from treq.client import _scoped_cookiejar_from_dict
    from twisted.web.client import URI
    from twisted.web.http_headers import Headers

    from mxmrelay.forwarder import MultipartProducer

    url = EncodedURL.from_text("https://api.example.net/v1/sends")
    uri = url.to_uri().to_text().encode("ascii")
    headers = Headers({b"Authorization": [b"Bearer x"], b"Accept": [b"application/json"]})

    def copy_and_set() -> None:
        h = headers.copy()
        h.setRawHeaders(b"Idempotency-Key", [b"k" * 64])
        h.setRawHeaders(b"Content-Type", [b"multipart/form-data; boundary=x"])

    steps: list[tuple[str, Callable[[], object]]] = [
        ("treq: URL to_uri + encode (IDNA)", lambda: url.to_uri().to_text().encode("ascii")),
        ("treq: cookie jar for the request", lambda: _scoped_cookiejar_from_dict(url, None)),
        ("Agent: URI.fromBytes", lambda: URI.fromBytes(uri)),
        ("forwarder: headers copy + 2 set", copy_and_set),
        ("forwarder: multipart producer", lambda: MultipartProducer(
            b"{}", b"From: x\r\n", io.BytesIO(b"x" * 2048))),
    ]
    return [f"{name:36} {best(f, number):8.1f} us" for name, f in steps]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def post_cpu(count: int) -> list[str]:
    """Client CPU per POST, treq's ``post`` and the Agent's ``request``, alternating."""
    import treq
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import deferLater

    from mxmrelay.forwarder import Forwarder, MultipartProducer

    port = _free_port()
    api = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "bench.nullapi",
                            "--port", str(port)])
    url = f"http://127.0.0.1:{port}/v1/sends"
    head, body = b"From: a <app@example.com>\r\nTo: <b@example.org>\r\n", b"x" * 2048
    results: dict[str, list[float]] = {"treq HTTPClient.post": [], "Agent.request": []}

    async def one(fw: Forwarder, how: str, i: int) -> None:
        producer = MultipartProducer(json.dumps({"id": str(i)}).encode(), head,
                                     io.BytesIO(body))
        h = fw._headers.copy()
        h.setRawHeaders(b"Idempotency-Key", [str(i).encode()])
        h.setRawHeaders(b"Content-Type", [producer.content_type])
        if how == "Agent.request":
            response = await fw._agent.request(b"POST", fw._uri, h, producer)
        else:
            response = await fw._client.post(fw._parsed_url, data=producer, headers=h,
                                             allow_redirects=False)
        await treq.content(response)

    async def main() -> None:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                await deferLater(reactor, 0.05, lambda: None)
        fw = Forwarder(reactor, url, "token", 10)
        for how in results:
            for i in range(100):
                await one(fw, how, i)
        for _ in range(3):
            for how in results:
                c0 = time.process_time()
                for i in range(count):
                    await one(fw, how, i)
                results[how].append((time.process_time() - c0) / count * 1e6)
        await fw.close()

    def stop(result: Any) -> Any:
        reactor.stop()
        return result

    ensureDeferred(main()).addBoth(stop)
    reactor.run()
    api.terminate()
    api.wait()
    return [f"{how:24} {min(v):6.0f} us client CPU per POST (runs: "
            + ", ".join(f"{x:.0f}" for x in v) + ")" for how, v in results.items()]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sendcost")
    p.add_argument("--post", action="store_true", help="also POST to a null API")
    p.add_argument("--number", type=int, default=3000)
    a = p.parse_args()
    print("\n".join(rules_table(a.number)))
    print()
    print("\n".join(client_steps(a.number * 3)))
    if a.post:
        print()
        print("\n".join(post_cpu(a.number)))


if __name__ == "__main__":
    main()
