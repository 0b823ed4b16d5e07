"""The Received trace field the relay writes at the top of each message
(RFC 5321 4.4), so that the message's path stays traceable.  Pure: the
time is passed in."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from email.utils import format_datetime

_HOST_UNSAFE = re.compile(r'[^\x21-\x7e]|[()\\";]')


def _host(text: str, default: str) -> str:
    """A HELO name or the like, made safe to put in a trace field."""
    text = _HOST_UNSAFE.sub("?", text.strip())[:255]
    return text or default


#: :func:`_host` for what comes back message after message (HELO names,
#: the relay's own name): a send id, new each time, is not kept.
_known_host = functools.lru_cache(maxsize=1024)(_host)


@functools.lru_cache(maxsize=1024)
def _tcp_info(client_address: str) -> str:
    # Cached: a relay's clients come back message after message, and
    # parsing an address is most of the field's cost.
    try:
        ip = ipaddress.ip_address(client_address.strip().strip("[]").split("%")[0])
    except ValueError:
        return _host(client_address, "unknown")
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"[{ip.ipv4_mapped}]"
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"


def received_header(
    *,
    helo: str,
    client_address: str,
    by_host: str,
    protocol: str,
    send_id: str,
    recipient: str | None,
    when: datetime.datetime,
) -> bytes:
    """An RFC 5321 trace field, so that the message's path stays traceable.

    ``when`` should be timezone-aware; a naive one is written as ``-0000``
    (zone unknown).  The recipient appears only when it cannot break the
    field (no controls, spaces or angle brackets).
    """
    lines = [
        ["Received: from", _known_host(helo, "unknown"), f"({_tcp_info(client_address)})"],
        [
            f"by {_known_host(by_host, 'localhost')}",
            f"with {_known_host(protocol, 'ESMTP')}",
            f"id {_host(send_id, 'unknown')}",
        ],
    ]
    date = _date(when.replace(microsecond=0), when.utcoffset())
    if recipient and not re.search(r"[\s<>]", recipient) and recipient.isprintable():
        lines.append([f"for <{recipient}>;", date])
    else:
        lines.append([f"; {date}"])
    out: list[bytes] = []
    for i, words in enumerate(lines):
        line = b"" if i == 0 else b"\t"
        for j, word in enumerate(words):
            w = word.encode("utf-8", "surrogatepass")
            if j == 0:
                line += w
            elif len(line) + 1 + len(w) < 78:
                line += b" " + w
            else:
                out.append(line + b"\r\n")
                line = b"\t" + w
        out.append(line + b"\r\n")
    return b"".join(out)


@functools.lru_cache(maxsize=8)
def _date(when: datetime.datetime, offset: datetime.timedelta | None) -> str:
    # Cached: every send in the same second shares its date text.  (The
    # offset is in the key: equal instants in two zones are equal datetimes.)
    return format_datetime(when)

