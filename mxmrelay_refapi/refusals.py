"""Refused mail: the records the relay POSTs to ``/v1/refusals``, stored
and shown beside the sends.

The relay reports every transaction it refused after AUTH (the sender
domain, a rule, the size, a recipient or sending limit, this API's own
refusals), batched and best effort: a record may be lost, never
duplicated on purpose, and carries nothing of the body.  Validation is as
strict as for sends (every key, no unknown one): a relay that drifts
from ``docs/delivery-api.yaml`` is caught here.
"""

from __future__ import annotations

import datetime
import html
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import attrs

from mxmrelay_refapi.contract import BadRequest
from mxmrelay_refapi.query import Instant, _instant, stamp

__all__ = ["MAX_BATCH", "REFUSALS_SCHEMA", "RefusalQuery", "insert_refusals",
           "parse_refusals", "render_refusals", "select_refusals"]

#: Records one POST may carry.
MAX_BATCH = 1000
#: Records a page shows at most.
MAX_LIMIT = 500

REFUSALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS refusals (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    customer TEXT NOT NULL,
    user TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refusals_user_time ON refusals (user, time);
CREATE INDEX IF NOT EXISTS refusals_time ON refusals (time)
"""

_KEYS = frozenset("time customer user sandbox client mail_from recipients reply message_id "
                  "subject".split())
_CLIENT_KEYS = frozenset(("address", "tls_version", "listener"))
_REPLY_KEYS = frozenset(("code", "enhanced", "text"))


def _keys(value: Any, where: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: must be a JSON object")
    missing, unknown = sorted(keys - value.keys()), sorted(value.keys() - keys)
    if missing:
        raise BadRequest(f"{where}: missing {', '.join(missing)}")
    if unknown:
        raise BadRequest(f"{where}: unknown {', '.join(unknown)}")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str, nullable: bool = False) -> None:
    value = obj[key]
    if not (isinstance(value, str) or (nullable and value is None)):
        raise BadRequest(f"{where}.{key}: must be a string{' or null' if nullable else ''}")


def parse_refusals(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The batch, validated: each record with its time in stored form."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(data, list) or not 1 <= len(data) <= MAX_BATCH:
        raise BadRequest(f"body: must be a JSON array of 1 to {MAX_BATCH} refusals")
    out = []
    for i, item in enumerate(data):
        where = f"[{i}]"
        r = _keys(item, where, _KEYS)
        for key in ("customer", "user", "mail_from"):
            _str(r, key, where)
        for key in ("message_id", "subject"):
            _str(r, key, where, nullable=True)
        if not isinstance(r["sandbox"], bool):
            raise BadRequest(f"{where}.sandbox: must be true or false")
        recipients = r["recipients"]
        if not isinstance(recipients, list) or not all(isinstance(x, str) for x in recipients):
            raise BadRequest(f"{where}.recipients: must be a list of strings")
        client = _keys(r["client"], f"{where}.client", _CLIENT_KEYS)
        _str(client, "address", f"{where}.client")
        _str(client, "listener", f"{where}.client")
        _str(client, "tls_version", f"{where}.client", nullable=True)
        reply = _keys(r["reply"], f"{where}.reply", _REPLY_KEYS)
        code = reply["code"]
        if type(code) is not int or not 400 <= code <= 599:
            raise BadRequest(f"{where}.reply.code: must be an integer from 400 to 599")
        _str(reply, "enhanced", f"{where}.reply")
        _str(reply, "text", f"{where}.reply")
        if not isinstance(r["time"], str) or "T" not in r["time"].upper():
            raise BadRequest(f"{where}.time: must be an RFC 3339 date-time")
        when = _instant(f"{where}.time", r["time"])
        assert when is not None
        out.append((when.stored, r))
    return out


def insert_refusals(conn: sqlite3.Connection, records: Sequence[tuple[str, dict[str, Any]]]
                    ) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO refusals (time, customer, user, record) VALUES (?, ?, ?, ?)",
            [(when, r["customer"], r["user"].lower(), json.dumps(r)) for when, r in records])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(records)


@attrs.frozen
class RefusalQuery:
    """``user`` (whole, case-insensitive), ``since`` (inclusive) to
    ``until`` (exclusive), at most ``limit``, newest first."""

    user: str | None = None
    since: Instant | None = None
    until: Instant | None = None
    limit: int = 100

    @classmethod
    def from_args(cls, args: Mapping[bytes, list[bytes]]) -> RefusalQuery:
        known = {"user", "since", "until", "limit"}
        values: dict[str, str] = {}
        for key, vals in args.items():
            name = key.decode("utf-8", "replace")
            if name not in known:
                raise BadRequest(f"{name}: unknown parameter (known: limit, since, until, user)")
            if len(vals) != 1:
                raise BadRequest(f"{name}: give it once")
            values[name] = vals[0].decode("utf-8", "replace")
        limit = values.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            raise BadRequest(f"limit: must be an integer from 1 to {MAX_LIMIT}")
        return cls(user=values.get("user") or None,
                   since=_instant("since", values.get("since") or None),
                   until=_instant("until", values.get("until") or None), limit=int(limit))


def select_refusals(conn: sqlite3.Connection, query: RefusalQuery) -> list[dict[str, Any]]:
    where, params = [], []
    if query.user is not None:
        where.append("user = ?")
        params.append(query.user.lower())
    if query.since is not None:
        where.append("time >= ?")
        params.append(query.since.stored)
    if query.until is not None:
        where.append("time < ?")
        params.append(query.until.stored)
    sql = "SELECT record FROM refusals"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " ORDER BY time DESC, seq DESC LIMIT ?", (*params, query.limit))
    return [json.loads(row[0]) for row in rows]


def now() -> str:
    return stamp(datetime.datetime.now(datetime.UTC))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_refusals(records: Sequence[dict[str, Any]], query: RefusalQuery) -> str:
    """The refusals section of the reports page: a filter form, then a table."""
    def field(name: str, value: str | None) -> str:
        return (f'<label>{name}: <input name="{name}" value="{_e(value or "")}"></label> ')

    out = ['<section id="refusals"><h2>Refused transactions</h2>\n',
           '<form class="filter" method="get" action="/refusals">',
           field("user", query.user),
           field("since", query.since.text if query.since else None),
           field("until", query.until.text if query.until else None),
           '<button type="submit">Filter</button></form>\n']
    if not records:
        out.append('<p class="empty">No refusals.</p></section>\n')
        return "".join(out)
    out.append('<table class="refusals"><tr><th>time</th><th>user</th><th>listener</th>'
               '<th>from</th><th>recipients</th><th>reply</th><th>Message-ID</th>'
               '<th>Subject</th></tr>\n')
    for r in records:
        reply = r["reply"]
        user = urlencode({"user": r["user"]})
        sandbox = ' <span class="sandbox">sandbox</span>' if r["sandbox"] else ""
        out.append(
            f'<tr class="refusal"><td><time>{_e(r["time"])}</time></td>'
            f'<td><a href="/refusals?{_e(user)}">{_e(r["user"])}</a>{sandbox}</td>'
            f'<td>{_e(r["client"]["listener"])}</td><td>{_e(r["mail_from"])}</td>'
            f'<td>{_e(", ".join(r["recipients"]))}</td>'
            f'<td class="reply"><code>{_e(reply["code"])} {_e(reply["enhanced"])} '
            f'{_e(reply["text"])}</code></td>'
            f'<td>{_e(r["message_id"] or "")}</td><td>{_e(r["subject"] or "")}</td></tr>\n')
    out.append("</table></section>\n")
    return "".join(out)
