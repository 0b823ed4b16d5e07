"""The reports' list query: its parameters, each checked (pure).

``GET /v1/sends`` and the HTML index take the same parameters
(``docs/delivery-api.yaml``, ``#/components/parameters``); a bad or unknown
one is a 400 whose message starts with its name.  The page they select is
found by :mod:`mxmrelay_refapi.pages`.
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Mapping, Sequence

import attrs

from mxmrelay_refapi.contract import SEND_ID, BadRequest

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_ADDRESS",
    "MAX_LIMIT",
    "MAX_TAG_FILTERS",
    "Instant",
    "SendQuery",
    "address_key",
    "stamp",
]

#: ``#/components/parameters/Limit``: its default and maximum.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: ``Tag``'s maxItems: more filters than this in one query is a client bug.
MAX_TAG_FILTERS = 50
#: ``To``'s maxLength: longer than any address (RFC 5321 allows 256 octets).
MAX_ADDRESS = 320


_LIST_PARAMETERS = ("tag", "limit", "before", "after", "since", "until", "to")
#: The HTML form's fields: left empty, they are absent (any other is an error).
_FORM_FIELDS = frozenset(("tag", "since", "until", "to"))
_TIMESTAMP = re.compile(
    r"(?P<date>\d{4}-\d\d-\d\d)"
    r"(?:[Tt ](?P<time>\d\d:\d\d:\d\d)(?:\.(?P<fraction>\d{1,9}))?"
    r"(?P<zone>[Zz]|[+ -](?:[01]\d|2[0-3]):[0-5]\d))?"
)


@attrs.frozen
class Instant:
    """A ``since`` or ``until`` bound: as given, and in stored form."""

    #: As the client wrote it (shown again in the HTML form).
    text: str
    #: Comparable with ``received_at`` (see :func:`stamp`).
    stored: str


@attrs.frozen
class SendQuery:
    """What the list of sends was asked for, every value checked.

    ``since`` is inclusive and ``until`` exclusive, so that consecutive
    ranges (a day, the next day) never count a send twice.  ``before``
    and ``after`` are send ids: the page holds the sends stored just before
    (older than) or just after (newer than) that one, newest first.
    """

    tags: tuple[str, ...] = ()
    limit: int = DEFAULT_LIMIT
    before: str | None = None
    after: str | None = None
    since: Instant | None = None
    until: Instant | None = None
    #: An :func:`address_key`, matched against the To and the BCC recipient.
    to: str | None = None

    @classmethod
    def from_args(cls, args: Mapping[bytes, Sequence[bytes]]) -> SendQuery:
        """Check the query string's parameters; raise :class:`BadRequest`.

        The message names the parameter.  Unknown parameters are refused,
        so that a misspelt filter is not silently a list of everything.
        Empty values (unused form fields) count as absent.
        """
        values: dict[str, list[str]] = {}
        for raw_name, raw_values in args.items():
            name = raw_name.decode("utf-8", "replace")
            if name not in _LIST_PARAMETERS:
                raise BadRequest(f"{name}: unknown parameter; known: {', '.join(_LIST_PARAMETERS)}")
            try:
                given = [v.decode("utf-8") for v in raw_values]
            except UnicodeDecodeError:
                raise BadRequest(f"{name}: must be UTF-8") from None
            values[name] = [v for v in given if v] if name in _FORM_FIELDS else given
        one = functools.partial(_one, values)
        tags = values.get("tag", [])
        if len(tags) > MAX_TAG_FILTERS:
            raise BadRequest(f"tag: at most {MAX_TAG_FILTERS} tags")
        before, after = one("before"), one("after")
        for name, cursor in (("before", before), ("after", after)):
            if cursor is not None and not SEND_ID.fullmatch(cursor):
                raise BadRequest(f"{name}: must be a send id (1 to 64 of [A-Za-z0-9_-])")
        if before is not None and after is not None:
            raise BadRequest("before: give before or after, not both")
        since, until = _instant("since", one("since")), _instant("until", one("until"))
        if since is not None and until is not None and since.stored >= until.stored:
            raise BadRequest("until: must be later than since (since is inclusive, until not)")
        return cls(
            tags=tuple(dict.fromkeys(tags)),
            limit=_limit(one("limit")),
            before=before,
            after=after,
            since=since,
            until=until,
            to=_to(one("to")),
        )

    def filters(self) -> list[tuple[str, str]]:
        """The parameters of this list less the cursor: for links to its pages."""
        pairs = [("tag", t) for t in self.tags]
        if self.to is not None:
            pairs.append(("to", self.to))
        for name, bound in (("since", self.since), ("until", self.until)):
            if bound is not None:
                pairs.append((name, bound.text))
        return [*pairs, ("limit", str(self.limit))]


def _one(values: Mapping[str, list[str]], name: str) -> str | None:
    given = values.get(name, [])
    if len(given) > 1:
        raise BadRequest(f"{name}: give it once")
    return given[0] if given else None


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not (value.isascii() and value.isdigit() and 1 <= int(value[:5]) <= MAX_LIMIT):
        raise BadRequest(f"limit: must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


def _to(value: str | None) -> str | None:
    if value is None:
        return None
    key = address_key(value)
    printable = all(c.isprintable() and not c.isspace() for c in key)
    if len(key) > MAX_ADDRESS or "@" not in key or not printable:
        raise BadRequest("to: must be one email address, local@domain")
    return key


def _instant(name: str, value: str | None) -> Instant | None:
    """An RFC 3339 date-time with its offset, or a date (midnight UTC).

    Fractions finer than the stored microseconds round up, which keeps
    both the inclusive and the exclusive bound exact.  A space where the
    offset's sign goes is read as ``+``: it is what an unencoded ``+``
    becomes in a query string.  A leap second is read as the next second.
    """
    if value is None:
        return None
    match = _TIMESTAMP.fullmatch(value)
    try:
        if match is None:
            raise ValueError(value)
        date = datetime.date.fromisoformat(match["date"])
        when = datetime.datetime(date.year, date.month, date.day, tzinfo=datetime.UTC)
        if match["time"] is not None:
            hour, minute, second = (int(x) for x in match["time"].split(":"))
            zone = match["zone"].upper().replace(" ", "+").replace("Z", "+00:00")
            offset = datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:]))
            leap = second == 60
            when = datetime.datetime(
                date.year,
                date.month,
                date.day,
                hour,
                minute,
                59 if leap else second,
                tzinfo=datetime.timezone(-offset if zone[0] == "-" else offset),
            )
            nanoseconds = int((match["fraction"] or "0").ljust(9, "0"))
            when += datetime.timedelta(seconds=leap, microseconds=-(-nanoseconds // 1000))
        stored = stamp(when)
    except (ValueError, OverflowError):
        raise BadRequest(
            f"{name}: must be an RFC 3339 date-time with an offset "
            "(2025-01-02T03:04:05Z, 2025-01-02T05:04:05+02:00) or a date (2025-01-02, UTC)"
        ) from None
    return Instant(text=value, stored=stored)


def address_key(address: str) -> str:
    """An address as the ``to`` filter compares it: lower case, no ``<>``.

    Case-insensitive as a person expects, though a local part may in
    theory be case-sensitive: support looks up a customer's address, and
    no receiving system of note tells ``Ann@`` from ``ann@``.
    """
    key = address.strip()
    if key.startswith("<") and key.endswith(">"):
        key = key[1:-1].strip()
    return key.lower()


def stamp(when: datetime.datetime) -> str:
    """The stored form of a time: RFC 3339, UTC, microseconds, fixed width.

    Fixed width so that text order is time order, in SQL too.
    """
    utc = when.astimezone(datetime.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"

