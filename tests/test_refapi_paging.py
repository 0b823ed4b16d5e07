"""The reports list's query parameters and the SQL of one page, without HTTP.

The parsing is pure, so every bad value is checked here; the SQL is checked
with SQLite's own query plan, because "a page costs its size, not the
store's" is a property of the plan and would otherwise regress silently.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from twisted.trial import unittest

from mxmrelay_refapi.contract import BadRequest
from mxmrelay_refapi.pages import page_sql, select_page
from mxmrelay_refapi.query import SendQuery, address_key
from mxmrelay_refapi.storage import connect


def query(*pairs: tuple[str, str]) -> SendQuery:
    args: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        args.setdefault(name.encode(), []).append(value.encode())
    return SendQuery.from_args(args)


class Parameters(unittest.TestCase):
    def test_defaults_and_values(self) -> None:
        self.assertEqual(query(), SendQuery())
        q = query(
            ("tag", "a"),
            ("tag", "b"),
            ("tag", "a"),
            ("tag", ""),
            ("limit", "500"),
            ("before", "01jabc"),
            ("to", " <Ann@Example.ORG> "),
            ("since", ""),
        )
        self.assertEqual(q.tags, ("a", "b"))
        self.assertEqual(
            (q.limit, q.before, q.after, q.to, q.since),
            (500, "01jabc", None, "ann@example.org", None),
        )
        self.assertEqual(
            q.filters(), [("tag", "a"), ("tag", "b"), ("to", "ann@example.org"), ("limit", "500")]
        )

    def test_timestamps(self) -> None:
        cases = {
            "2025-01-02T03:04:05Z": "2025-01-02T03:04:05.000000Z",
            "2025-01-02t03:04:05z": "2025-01-02T03:04:05.000000Z",
            "2025-01-02T05:04:05+02:00": "2025-01-02T03:04:05.000000Z",
            # An unencoded "+" arrives as a space.
            "2025-01-02T05:04:05 02:00": "2025-01-02T03:04:05.000000Z",
            "2025-01-01T23:04:05.5-04:00": "2025-01-02T03:04:05.500000Z",
            "2025-01-02": "2025-01-02T00:00:00.000000Z",
            # Finer than microseconds: rounded up, so both bounds stay exact.
            "2025-01-02T03:04:05.0000001Z": "2025-01-02T03:04:05.000001Z",
            "2025-01-02T03:04:05.9999999Z": "2025-01-02T03:04:06.000000Z",
            "2016-12-31T23:59:60Z": "2017-01-01T00:00:00.000000Z",
        }
        for text, stored in cases.items():
            since = query(("since", text)).since
            assert since is not None
            self.assertEqual((since.text, since.stored), (text, stored))

    def test_bad_values_name_the_parameter(self) -> None:
        bad: list[tuple[tuple[tuple[str, str], ...], str]] = [
            ((("limit", "0"),), "limit"),
            ((("limit", "501"),), "limit"),
            ((("limit", ""),), "limit"),
            ((("limit", "٣"),), "limit"),
            ((("limit", "1"), ("limit", "2")), "limit"),
            ((("before", ""),), "before"),
            ((("before", "a/b"),), "before"),
            ((("before", "x" * 65),), "before"),
            ((("after", "a b"),), "after"),
            ((("before", "a"), ("after", "b")), "before"),
            ((("since", "yesterday"),), "since"),
            ((("since", "2025-01-02T03:04:05"),), "since"),  # no offset
            ((("since", "2025-02-30"),), "since"),
            ((("since", "2025-01-02T24:00:00Z"),), "since"),
            ((("since", "2025-01-02T03:04:05+24:00"),), "since"),
            ((("since", "0000-01-01"),), "since"),
            ((("until", "9999-12-31T23:59:59-23:00"),), "until"),
            ((("until", "2025-01-02T03:04Z"),), "until"),
            ((("since", "2025-01-02"), ("until", "2025-01-02")), "until"),
            ((("since", "2025-01-03"), ("until", "2025-01-02")), "until"),
            ((("to", "no-at-sign"),), "to"),
            ((("to", "a b@example.org"),), "to"),
            ((("to", "a@example.org\x00"),), "to"),
            ((("to", "a@" + "x" * 400),), "to"),
            ((("to", "a@x"), ("to", "b@x")), "to"),
            (tuple(("tag", str(i)) for i in range(51)), "tag"),
            ((("befor", "x"),), "befor"),
        ]
        for pairs, name in bad:
            with self.assertRaises(BadRequest, msg=repr(pairs)) as caught:
                query(*tuple(pairs))
            self.assertTrue(str(caught.exception).startswith(name + ":"), str(caught.exception))
        with self.assertRaisesRegex(BadRequest, "^to: must be UTF-8"):
            SendQuery.from_args({b"to": [b"\xff@x"]})

    def test_address_key(self) -> None:
        self.assertEqual(address_key("<Ann@Example.org>"), "ann@example.org")
        self.assertEqual(address_key("ÅSA@exämple.org"), "åsa@exämple.org")


OLD_SCHEMA = """
CREATE TABLE sends (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, idempotency_key TEXT NOT NULL,
    customer TEXT NOT NULL, user TEXT NOT NULL, mail_from TEXT NOT NULL,
    return_path TEXT NOT NULL, rcpt_to TEXT NOT NULL, bcc TEXT, flags INTEGER NOT NULL,
    bcc_flags INTEGER, tags TEXT NOT NULL, client TEXT NOT NULL, message_id TEXT,
    received_at TEXT NOT NULL, size INTEGER NOT NULL, message BLOB NOT NULL,
    UNIQUE (customer, idempotency_key)
);
CREATE TABLE send_tags (
    tag TEXT NOT NULL, seq INTEGER NOT NULL REFERENCES sends (seq) ON DELETE CASCADE,
    PRIMARY KEY (tag, seq)
) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


class Storage(unittest.TestCase):
    def connect(self) -> sqlite3.Connection:
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        conn = connect(folder / "sends.sqlite3")
        self.addCleanup(conn.close)
        return conn

    def plan(self, conn: sqlite3.Connection, sql: str, params: list[object]) -> str:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        return "\n".join(str(row[-1]) for row in rows)

    def test_pages_walk_an_index_without_sorting(self) -> None:
        """No plan sorts (which would read every match) or scans past its index."""
        conn = self.connect()
        cases = [
            (SendQuery(), "d USING INTEGER PRIMARY KEY"),
            (SendQuery(tags=("a",)), "d USING PRIMARY KEY (tag=? AND seq>? AND seq<?)"),
            (SendQuery(tags=("a", "b")), "d USING PRIMARY KEY (tag=? AND seq>? AND seq<?)"),
            (SendQuery(to="a@x"), "d USING PRIMARY KEY (address=? AND seq>? AND seq<?)"),
            (SendQuery(to="a@x", tags=("a",)), "d USING PRIMARY KEY (address=?"),
        ]
        for q, search in cases:
            for newest_first in (True, False):
                sql, params = page_sql(q, 1, 100, newest_first=newest_first, limit=51)
                plan = self.plan(conn, sql, params)
                self.assertNotIn("TEMP B-TREE", plan, (q, plan))
                self.assertIn("SEARCH " + search, plan.replace(">=", ">"), (q, plan))
                self.assertNotIn("SCAN", plan, (q, plan))
        plan = self.plan(
            conn,
            "SELECT seq FROM sends WHERE received_at >= ? ORDER BY received_at, seq LIMIT 1",
            ["2025-01-01"],
        )
        self.assertIn("USING COVERING INDEX sends_received_at", plan)
        self.assertNotIn("TEMP B-TREE", plan)

    def test_old_database_is_upgraded(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        path = folder / "old.sqlite3"
        old = sqlite3.connect(path)
        old.executescript(OLD_SCHEMA)
        message = b"From: a@example.com\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\n\r\nHi\r\n"
        client = json.dumps({"address": "192.0.2.1", "tls_version": None, "listener": "smtp"})
        old.execute(
            "INSERT INTO sends VALUES (1, 'old', 'k', 'demo', 'u', 'a@example.com', 'r',"
            " 'Ann@Example.org', 'Audit@example.com', 0, 0, '[]', ?,"
            " NULL, '2025-01-02T03:04:05.000000Z', ?, ?)",
            (client, len(message), message),
        )
        old.commit()
        old.close()
        conn = connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 3)
        self.assertEqual(
            conn.execute("SELECT subject FROM sends").fetchone()[0], "=?utf-8?q?Caf=C3=A9?="
        )
        self.assertEqual(
            conn.execute("SELECT address FROM send_recipients ORDER BY 1").fetchall(),
            [("ann@example.org",), ("audit@example.com",)],
        )
        page = select_page(conn, SendQuery(to="audit@example.com"))
        self.assertEqual([s.id for s in page.sends], ["old"])
        conn.close()
        again = connect(path)  # Opened again: nothing to do, nothing doubled.
        self.addCleanup(again.close)
        self.assertEqual(again.execute("SELECT count(*) FROM send_recipients").fetchone()[0], 2)
