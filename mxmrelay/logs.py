"""``log_format = "json"``: one JSON object a line, for a log pipeline.

Built on ``twisted.logger``: every log call in the relay already carries
its facts as event fields (``client``, ``listener``, ``user``, ``id``,
``reply``, ``size``, ...), so a JSON line is the event itself: its time,
level, namespace, the text the classic format would print, and those
fields as they are, numbers as numbers.  The text format stays the
default (and the one the fail2ban filter reads).

What the relay logs never includes a password, an AUTH exchange or a
message's content, in either format; as a second line of defence a field
whose name says it is a secret is dropped here.
"""

from __future__ import annotations

import datetime
import json
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

#: Fields never written, whoever logs them.
SECRET_FIELDS = frozenset({"password", "passwd", "credentials", "token", "secret",
                           "authorization", "response"})
#: What ``twisted.python.log``'s legacy events carry besides their text.
_LEGACY_FIELDS = frozenset({"message", "isError", "format", "why", "failure", "time",
                            "system", "printed"})
_SCALARS = (str, int, float, bool, type(None))


def json_line(event: dict[str, Any], extra: dict[str, Any] | None = None) -> str | None:
    """One event as one line of JSON (with its newline)."""
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": None if when is None else datetime.datetime.fromtimestamp(
            when, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "event": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if (key.startswith("log_") or key in record or key in _LEGACY_FIELDS
                or key.lower() in SECRET_FIELDS):
            continue
        record[key] = value if isinstance(value, _SCALARS) else str(value)
    if extra:
        record.update(extra)
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def json_observer(out: IO[str], **extra: Any) -> ILogObserver:
    """An observer writing :func:`json_line` to ``out``; ``extra``: fields
    for every line (a worker's ``worker`` index)."""
    return FileLogObserver(out, lambda event: json_line(event, extra))
