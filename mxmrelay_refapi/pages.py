"""One page of the reports' list, found in storage (on the database thread).

Paging is by storage order (``seq``), which is what "newest first" has
always meant here: a send id is minted by the relay before the send is
stored, so a late retry can store an older id after newer ones, and paging
by id would slot it into pages already seen.  By storage order a walk of
``next`` cursors sees every send stored before it began exactly once, and
nothing stored since.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import attrs

from mxmrelay_refapi.contract import BadRequest, StoredSend
from mxmrelay_refapi.query import Instant, SendQuery
from mxmrelay_refapi.storage import COLUMNS, row_to_send

__all__ = ["SendPage", "page_sql", "select_page", "seq_at"]


@attrs.frozen
class SendPage:
    """One page of the list, newest first, and the cursors to its neighbours."""

    sends: tuple[StoredSend, ...]
    #: Pass as ``before`` for the next (older) page; None when there is none.
    next: str | None
    #: Pass as ``after`` for the previous (newer) page; None when there is none.
    prev: str | None

    def to_json(self) -> dict[str, Any]:
        return {"sends": [s.to_json() for s in self.sends], "next": self.next, "prev": self.prev}


def page_sql(
    query: SendQuery, low: int | None, high: int | None, *, newest_first: bool, limit: int
) -> tuple[str, list[object]]:
    """The SELECT of the matching sends with ``low <= seq < high``, in order.

    It walks one index in ``seq`` order and stops after ``limit`` rows, so
    a page costs about its size, not the store's: the recipient index when
    ``to`` is given, else the first tag's, else the table itself.  Further
    tags are looked up per candidate row in ``send_tags``' primary key.
    Each row starts with its ``seq``.
    """
    params: list[object] = []
    tags = list(query.tags)
    if query.to is not None:
        source, where = "send_recipients d JOIN sends s ON s.seq = d.seq", ["d.address = ?"]
        params.append(query.to)
    elif tags:
        source, where = "send_tags d JOIN sends s ON s.seq = d.seq", ["d.tag = ?"]
        params.append(tags.pop(0))
    else:
        source, where = "sends d", []
    for tag in tags:
        where.append("EXISTS (SELECT 1 FROM send_tags t WHERE t.tag = ? AND t.seq = d.seq)")
        params.append(tag)
    if low is not None:
        where.append("d.seq >= ?")
        params.append(low)
    if high is not None:
        where.append("d.seq < ?")
        params.append(high)
    sql = (
        f"SELECT d.seq, {COLUMNS} FROM {source}"  # noqa: S608 (constant SQL, values are parameters)
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY d.seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
    )
    return sql, [*params, limit]


def select_page(conn: sqlite3.Connection, query: SendQuery) -> SendPage:
    """The page ``query`` asks for; :class:`BadRequest` for an unknown cursor."""
    low, high = seq_at(conn, query.since), seq_at(conn, query.until)
    if query.since is not None and low is None:
        return SendPage((), None, None)  # Nothing was stored since then.
    cursor = _cursor_seq(conn, query)
    older = query.after is None
    first, last = low, high
    if cursor is not None and older:
        last = cursor if last is None else min(last, cursor)
    elif cursor is not None:
        first = cursor + 1 if first is None else max(first, cursor + 1)

    def rows(low: int | None, high: int | None, newest_first: bool, limit: int) -> list[Any]:
        sql, params = page_sql(query, low, high, newest_first=newest_first, limit=limit)
        return conn.execute(sql, params).fetchall()

    found = rows(first, last, older, query.limit + 1)
    more, found = len(found) > query.limit, found[: query.limit]
    if not older:
        found.reverse()
    if not found:
        return SendPage((), None, None)
    newest, oldest = found[0], found[-1]
    if older:
        later = cursor is not None and bool(rows(newest[0] + 1, high, False, 1))
        earlier = more
    else:
        later, earlier = more, bool(rows(low, oldest[0], True, 1))
    return SendPage(
        sends=tuple(row_to_send(row[1:]) for row in found),
        next=oldest[1] if earlier else None,
        prev=newest[1] if later else None,
    )


def _cursor_seq(conn: sqlite3.Connection, query: SendQuery) -> int | None:
    name, send_id = ("before", query.before) if query.after is None else ("after", query.after)
    if send_id is None:
        return None
    row = conn.execute("SELECT seq FROM sends WHERE id = ?", (send_id,)).fetchone()
    if row is None:
        raise BadRequest(f"{name}: no send {send_id!r}")
    return int(row[0])


def seq_at(conn: sqlite3.Connection, bound: Instant | None) -> int | None:
    """The first send stored at or after ``bound``, by the received-time index.

    ``received_at`` never decreases in storage order (``mxmrelay_refapi.storage._received_at``),
    so every send from this one on is at or after ``bound`` and none before.
    """
    if bound is None:
        return None
    row = conn.execute(
        "SELECT seq FROM sends WHERE received_at >= ? ORDER BY received_at, seq LIMIT 1",
        (bound.stored,),
    ).fetchone()
    return None if row is None else int(row[0])

