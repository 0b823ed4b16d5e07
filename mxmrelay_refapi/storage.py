"""Storage: every send in SQLite, with its metadata and final message.

One connection, used from one thread (:class:`Database`): SQLite serialises
writers anyway, and one thread keeps every statement off the reactor's
without any locking of our own.  The functions taking a connection run
there.  Idempotency is the database's: a UNIQUE (customer,
idempotency_key) constraint is the only arbiter, so two writers (threads or
processes) racing with one key store one row.

The schema is versioned with ``PRAGMA user_version``; :func:`connect`
upgrades an older database in place, once.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sqlite3
from collections.abc import Callable, Sequence
from typing import IO, Any, Concatenate, ParamSpec, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mxmrelay_refapi.contract import BadRequest, ClientInfo, SendMetadata, StoredSend
from mxmrelay_refapi.messages import header_field, split_message
from mxmrelay_refapi.multipart import CHUNK, message_parts
from mxmrelay_refapi.query import address_key, stamp
from mxmrelay_refapi.refusals import REFUSALS_SCHEMA

__all__ = [
    "COLUMNS",
    "Conflict",
    "Database",
    "Stored",
    "connect",
    "insert_send",
    "row_to_send",
    "select_message",
    "select_send",
    "select_send_preview",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Conflict(Exception):
    """The send id is already stored under another Idempotency-Key."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sends (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL,
    customer TEXT NOT NULL,
    user TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    return_path TEXT NOT NULL,
    rcpt_to TEXT NOT NULL,
    bcc TEXT,
    flags INTEGER NOT NULL,
    bcc_flags INTEGER,
    tags TEXT NOT NULL,
    client TEXT NOT NULL,
    message_id TEXT,
    received_at TEXT NOT NULL,
    size INTEGER NOT NULL,
    message BLOB NOT NULL,
    UNIQUE (customer, idempotency_key)
);
CREATE TABLE IF NOT EXISTS send_tags (
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL REFERENCES sends (seq) ON DELETE CASCADE,
    PRIMARY KEY (tag, seq)
) WITHOUT ROWID;
"""

#: Version 2 adds what the reports' filters and pages use: the recipients and
#: the received time indexed, and the Subject kept apart from the message BLOB.
_SCHEMA_2 = """
ALTER TABLE sends ADD COLUMN subject TEXT;
CREATE TABLE send_recipients (
    address TEXT NOT NULL,
    seq INTEGER NOT NULL REFERENCES sends (seq) ON DELETE CASCADE,
    PRIMARY KEY (address, seq)
) WITHOUT ROWID;
CREATE INDEX sends_received_at ON sends (received_at);
"""

#: Version 3: sandbox sends (never delivered), with the header section the
#: client submitted; and the refusals the relay reports (refusals.py).
_SCHEMA_3 = """
ALTER TABLE sends ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sends ADD COLUMN submitted_headers BLOB
"""

COLUMNS = (
    "id, idempotency_key, customer, user, mail_from, return_path, rcpt_to, bcc, flags, "
    "bcc_flags, tags, client, message_id, received_at, size, subject, sandbox"
)
#: How much of a message's start is searched for its Subject field.
_SUBJECT_HEAD = 64 * 1024
#: The longest Subject kept for the reports (a longer one is cut).
_SUBJECT_MAX = 2000


def connect(database: pathlib.Path | str) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE)
    # so that the write lock is taken before the UNIQUE check, not after.
    conn = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a send is durable before its 201, as a 250 promises.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(_SCHEMA)
    _migrate(conn)
    _migrate_3(conn)
    return conn


def _migrate_3(conn: sqlite3.Connection) -> None:
    """Version 2 to 3, once, under the write lock (as :func:`_migrate`)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= 3:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 3:
            for statement in _SCHEMA_3.split(";"):
                conn.execute(statement)
            for statement in REFUSALS_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("PRAGMA user_version = 3")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a version 0 (new) or 1 database to version 2, once.

    Under the write lock, and the version read again under it, so that two
    processes opening one old database migrate it once.  Existing sends get
    their recipients and Subject from their stored metadata and message.
    """
    if conn.execute("PRAGMA user_version").fetchone()[0] >= 2:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 2:
            for statement in _SCHEMA_2.split(";"):
                if statement.strip():
                    conn.execute(statement)
            rows = conn.execute("SELECT seq, rcpt_to, bcc, size FROM sends").fetchall()
            for seq, to, bcc, size in rows:
                with conn.blobopen("sends", "message", seq, readonly=True) as blob:
                    head = blob.read(min(size, _SUBJECT_HEAD))
                conn.execute("UPDATE sends SET subject = ? WHERE seq = ?", (_subject(head), seq))
                _insert_recipients(conn, seq, to, bcc)
            conn.execute("PRAGMA user_version = 2")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise



def _insert_recipients(conn: sqlite3.Connection, seq: int, to: str, bcc: str | None) -> None:
    keys = {address_key(to)} | ({address_key(bcc)} if bcc is not None else set())
    conn.executemany(
        "INSERT OR IGNORE INTO send_recipients (address, seq) VALUES (?, ?)",
        [(key, seq) for key in sorted(keys)],
    )


def _subject(head: bytes) -> str | None:
    """The raw (still RFC 2047 encoded) Subject of a message's start, or None."""
    raw = header_field(split_message(head)[0], b"subject")
    return None if raw is None else raw.decode("utf-8", "replace")[:_SUBJECT_MAX]


@attrs.frozen
class Stored:
    id: str
    duplicate: bool


def insert_send(
    conn: sqlite3.Connection,
    meta: SendMetadata,
    key: str,
    body: IO[bytes],
    start: int,
    boundary: bytes,
) -> Stored:
    """Store one send, or find the one stored under the same key.

    The UNIQUE (customer, idempotency_key) constraint is the only arbiter,
    so that two writers (threads or processes) racing with one key store one
    row; the loser learns the winner's id.  The message is copied into a
    zero-filled BLOB of the right size, a chunk at a time.
    """
    try:
        end, submitted = message_parts(body, start, boundary)
        if submitted is not None and not meta.sandbox:
            raise BadRequest("part 'submitted_headers': only a sandbox send carries one")
        size = end - start
        body.seek(start)
        subject = _subject(body.read(min(size, _SUBJECT_HEAD)))
        conn.execute("BEGIN IMMEDIATE")
        try:
            received_at = _received_at(conn)
            cursor = conn.execute(
                f"INSERT INTO sends ({COLUMNS}, message) "  # noqa: S608 (constant columns)
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, zeroblob(?))",
                (
                    meta.id,
                    key,
                    meta.customer,
                    meta.user,
                    meta.mail_from,
                    meta.return_path,
                    meta.to,
                    meta.bcc,
                    meta.flags,
                    meta.bcc_flags,
                    json.dumps(list(meta.tags)),
                    json.dumps(meta.client.to_json()),
                    meta.message_id,
                    received_at,
                    size,
                    subject,
                    int(meta.sandbox),
                    size,
                ),
            )
            seq = cursor.lastrowid
            assert seq is not None
            if submitted is not None:
                conn.execute("UPDATE sends SET submitted_headers = ? WHERE seq = ?",
                             (submitted, seq))
            _insert_recipients(conn, seq, meta.to, meta.bcc)
            conn.executemany(
                "INSERT OR IGNORE INTO send_tags (tag, seq) VALUES (?, ?)",
                [(tag, seq) for tag in meta.tags],
            )
            with conn.blobopen("sends", "message", seq) as blob:
                body.seek(start)
                remaining = size
                while remaining:
                    chunk = body.read(min(CHUNK, remaining))
                    if not chunk:
                        raise OSError("request body shrank while being stored")
                    blob.write(chunk)
                    remaining -= len(chunk)
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            row = conn.execute(
                "SELECT id FROM sends WHERE customer = ? AND idempotency_key = ?",
                (meta.customer, key),
            ).fetchone()
            if row is not None:
                return Stored(id=row[0], duplicate=True)
            raise Conflict(
                f"send id {meta.id!r} is already stored under another Idempotency-Key"
            ) from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Stored(id=meta.id, duplicate=False)
    finally:
        body.close()


def _received_at(conn: sqlite3.Connection) -> str:
    """Now, but never before the last stored send's time (inside the write lock).

    So that ``received_at`` never decreases in storage order, even when the
    clock steps back or two processes write: a time range is then one range
    of storage order, found through the index (see :func:`mxmrelay_refapi.pages.seq_at`).
    """
    now = stamp(datetime.datetime.now(datetime.UTC))
    row = conn.execute("SELECT received_at FROM sends ORDER BY seq DESC LIMIT 1").fetchone()
    return now if row is None or row[0] <= now else str(row[0])


def row_to_send(row: Sequence[Any]) -> StoredSend:
    (send_id, key, customer, user, mail_from, return_path, to, bcc, flags, bcc_flags) = row[:10]
    tags, client, message_id, received_at, size, subject, sandbox = row[10:]
    c = json.loads(client)
    return StoredSend(
        metadata=SendMetadata(
            id=send_id,
            customer=customer,
            user=user,
            mail_from=mail_from,
            return_path=return_path,
            to=to,
            bcc=bcc,
            flags=flags,
            bcc_flags=bcc_flags,
            tags=tuple(json.loads(tags)),
            client=ClientInfo(
                address=c["address"], tls_version=c["tls_version"], listener=c["listener"]
            ),
            message_id=message_id,
            sandbox=bool(sandbox),
        ),
        idempotency_key=key,
        received_at=received_at,
        size=size,
        subject=subject,
    )


def select_send(conn: sqlite3.Connection, send_id: str) -> StoredSend | None:
    row = conn.execute(
        f"SELECT {COLUMNS} FROM sends WHERE id = ?",  # noqa: S608 (constant columns)
        (send_id,),
    ).fetchone()
    return None if row is None else row_to_send(row)


def select_message(
    conn: sqlite3.Connection, send_id: str, limit: int | None = None
) -> bytes | None:
    """The stored message, or its first ``limit`` bytes."""
    row = conn.execute("SELECT seq FROM sends WHERE id = ?", (send_id,)).fetchone()
    if row is None:
        return None
    with conn.blobopen("sends", "message", row[0], readonly=True) as blob:
        return blob.read() if limit is None else blob.read(limit)


def select_send_preview(
    conn: sqlite3.Connection, send_id: str, limit: int
) -> tuple[StoredSend, bytes] | None:
    send = select_send(conn, send_id)
    if send is None:
        return None
    message = select_message(conn, send_id, limit)
    if send.metadata.sandbox:
        row = conn.execute("SELECT submitted_headers FROM sends WHERE id = ?",
                           (send_id,)).fetchone()
        send = attrs.evolve(send, submitted_headers=row[0] if row else None)
    return (send, message or b"")



@attrs.define
class Database:
    """One SQLite connection, and where its statements run.

    :meth:`threaded` runs them on one worker thread of its own (the
    service); :meth:`inline` runs them at once, in the caller's thread, so
    that tests of the web resources get their answers without a reactor
    turning (``successResultOf``).
    """

    conn: sqlite3.Connection
    _call: Callable[..., Deferred[Any]]
    _stop: Callable[[], None] = lambda: None
    closed: bool = False

    @classmethod
    def threaded(cls, database: pathlib.Path, reactor: Any) -> Database:
        """``reactor``: IReactorCore and IReactorFromThreads, which no one type says."""
        conn = connect(database)
        pool = ThreadPool(minthreads=1, maxthreads=1, name="mxmrelay-refapi-sqlite")
        pool.start()

        def call(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, pool, f, *args, **kwargs)

        return cls(conn, call, pool.stop)

    @classmethod
    def inline(cls, database: pathlib.Path | str = ":memory:") -> Database:
        def call(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            try:
                return succeed(f(*args, **kwargs))
            except Exception:
                return fail()

        return cls(connect(database), call)

    def run(
        self,
        f: Callable[Concatenate[sqlite3.Connection, _P], _R],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> Deferred[_R]:
        """``f(connection, *args, **kwargs)`` where statements run."""
        result: Deferred[_R] = self._call(f, self.conn, *args, **kwargs)
        return result

    def close(self) -> None:
        """Stop the worker thread (after its current job), then close the database."""
        if not self.closed:
            self.closed = True
            self._stop()
            self.conn.close()
