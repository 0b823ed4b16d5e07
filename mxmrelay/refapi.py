"""The reference delivery API: the other end of the relay's forwarder.

It stores each send the relay POSTs (contract v1, ``docs/delivery-api.yaml``)
in SQLite and serves the transactional reports over the stored sends, as JSON
under ``/v1/sends`` and as HTML for people under ``/`` and ``/sends/{id}``.
It exists so that the relay can be run, tested and demonstrated end to end
without the real platform, and so that the contract has one executable
reading besides the forwarder's.

Security: only ``POST /v1/sends`` needs the bearer token.  The reports (every
GET) need none, and they show whole messages, so bind this resource to
loopback or put it behind an authenticating proxy.

Serve it with :meth:`ReferenceAPI.site`, not a plain ``Site(api.resource)``:
by default ``twisted.web`` parses every ``multipart/form-data`` body into
``request.args`` (reading the whole body into memory again, and answering a
non-JSON 400 itself when the parse fails) and spools bodies of any size to
disk.  The resource works under a plain ``Site`` too, only at that cost.

The multipart body is parsed here rather than by ``twisted.web`` or the
``email`` package so that only the small metadata part is ever held in
memory: the message part is located in the spooled body and copied into its
SQLite BLOB in chunks, on the database thread.
"""

from __future__ import annotations

import datetime
import functools
import hmac
import io
import json
import pathlib
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from email.headerregistry import ContentDispositionHeader, ContentTypeHeader
from email.policy import HTTP
from typing import IO, Any, Concatenate, ParamSpec, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mxmrelay import reports
from mxmrelay.directory import MAX_FLAGS

__all__ = [
    "DEFAULT_MAX_BODY",
    "BadRequest",
    "ClientInfo",
    "Instant",
    "ReferenceAPI",
    "SendMetadata",
    "SendPage",
    "SendQuery",
    "StoredSend",
    "address_key",
    "page_sql",
]

DEFAULT_MAX_BODY = 60 * 1024 * 1024
"""The largest request body accepted, in bytes (413 above it)."""

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: More ``tag`` filters than this in one query is a client bug, not a report.
MAX_TAG_FILTERS = 50

SEND_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
# RFC 2046 bchars: 1..70 characters, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")

#: The metadata part is a small JSON object; anything bigger is not one.
_METADATA_MAX = 256 * 1024
_PART_HEADERS_MAX = 8 * 1024
#: How much of the body is read to find both parts' headers and the metadata.
_HEAD_MAX = _METADATA_MAX + 2 * _PART_HEADERS_MAX + 1024
#: The unit in which message bytes are scanned and copied.
_CHUNK = 1024 * 1024

_log = Logger()

_P = ParamSpec("_P")
_R = TypeVar("_R")


class BadRequest(Exception):
    """The request is malformed; the message says why (sent as the 400 body)."""


class _Conflict(Exception):
    """The send id is already stored under another Idempotency-Key."""


# --------------------------------------------------------------------------
# Metadata


@attrs.frozen
class ClientInfo:
    """Where the relay got the message from (reported, never interpreted)."""

    address: str
    tls_version: str | None
    listener: str

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "tls_version": self.tls_version, "listener": self.listener}


_METADATA_KEYS = frozenset(
    "version id customer user mail_from return_path to bcc flags bcc_flags tags client "
    "message_id".split()
)
_CLIENT_KEYS = frozenset(("address", "tls_version", "listener"))


@attrs.frozen
class SendMetadata:
    """The metadata part of a v1 send, validated.

    Validation is strict (every key present, no unknown key) because this
    API's job is to catch a forwarder that drifts from the contract; a
    future contract bumps ``version`` instead of adding keys silently.
    """

    id: str
    customer: str
    user: str
    mail_from: str
    return_path: str
    to: str
    bcc: str | None
    flags: int
    bcc_flags: int | None
    tags: tuple[str, ...]
    client: ClientInfo
    message_id: str | None

    @classmethod
    def from_json(cls, raw: bytes) -> SendMetadata:
        """Parse and validate the metadata part; raise :class:`BadRequest`."""
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"metadata is not valid JSON: {e}") from None
        obj = _object(data, "metadata", _METADATA_KEYS)
        version = obj["version"]
        if type(version) is not int or version != 1:
            raise BadRequest("metadata.version: must be 1")
        send_id = _text(obj, "id", "metadata")
        if not SEND_ID.fullmatch(send_id):
            raise BadRequest("metadata.id: must be 1 to 64 characters of [A-Za-z0-9_-]")
        tags = obj["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise BadRequest("metadata.tags: must be a list of strings")
        client = _object(obj["client"], "metadata.client", _CLIENT_KEYS)
        return cls(
            id=send_id,
            customer=_text(obj, "customer", "metadata"),
            user=_text(obj, "user", "metadata"),
            mail_from=_text(obj, "mail_from", "metadata"),
            return_path=_text(obj, "return_path", "metadata"),
            to=_text(obj, "to", "metadata"),
            bcc=_text(obj, "bcc", "metadata", nullable=True),
            flags=_flags(obj, "flags"),
            bcc_flags=_flags(obj, "bcc_flags", nullable=True),
            tags=tuple(tags),
            client=ClientInfo(
                address=_text(client, "address", "metadata.client"),
                tls_version=_string(client, "tls_version", "metadata.client", nullable=True),
                listener=_text(client, "listener", "metadata.client"),
            ),
            message_id=_string(obj, "message_id", "metadata", nullable=True),
        )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(value: Any, where: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: must be a JSON object")
    missing = sorted(keys - value.keys())
    if missing:
        raise BadRequest(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(value.keys() - keys)
    if unknown:
        raise BadRequest(f"{where}: unknown {', '.join(unknown)}")
    return value


def _string(obj: Mapping[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    value = obj[key]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{where}.{key}: must be a string{' or null' if nullable else ''}")
    return value


def _text(obj: Mapping[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    """A string that must not be empty (an address, a name)."""
    value = _string(obj, key, where, nullable=nullable)
    if value == "":
        raise BadRequest(f"{where}.{key}: must not be empty")
    return value


def _flags(obj: Mapping[str, Any], key: str, *, nullable: bool = False) -> Any:
    value = obj[key]
    if value is None and nullable:
        return None
    if type(value) is not int or not 0 <= value <= MAX_FLAGS:
        ornull = " or null" if nullable else ""
        raise BadRequest(f"metadata.{key}: must be an integer from 0 to {MAX_FLAGS}{ornull}")
    return value


@attrs.frozen
class StoredSend:
    """A send as the reports show it (the message itself is fetched apart)."""

    metadata: SendMetadata
    idempotency_key: str
    #: RFC 3339, UTC, set when the send was stored.
    received_at: str
    #: The message's size in bytes.
    size: int
    #: The message's Subject field as written (RFC 2047 words not decoded).
    subject: str | None = None

    @property
    def id(self) -> str:
        return self.metadata.id

    def to_json(self) -> dict[str, Any]:
        m = self.metadata
        return {
            "id": m.id,
            "customer": m.customer,
            "user": m.user,
            "mail_from": m.mail_from,
            "return_path": m.return_path,
            "to": m.to,
            "bcc": m.bcc,
            "flags": m.flags,
            "bcc_flags": m.bcc_flags,
            "tags": list(m.tags),
            "client": m.client.to_json(),
            "message_id": m.message_id,
            "received_at": self.received_at,
            "size": self.size,
            "idempotency_key": self.idempotency_key,
        }


# --------------------------------------------------------------------------
# multipart/form-data, read from the spooled body


def _boundary(content_type: bytes | None) -> bytes:
    if content_type is None:
        raise BadRequest("Content-Type must be multipart/form-data")
    header = HTTP.header_factory("content-type", content_type.decode("latin-1"))
    if not isinstance(header, ContentTypeHeader) or header.content_type != "multipart/form-data":
        raise BadRequest("Content-Type must be multipart/form-data")
    boundary = header.params.get("boundary")
    if not isinstance(boundary, str) or not _BOUNDARY.fullmatch(boundary):
        raise BadRequest("Content-Type: missing or invalid multipart boundary")
    return boundary.encode("ascii")


def _parse_head(body: IO[bytes], boundary: bytes) -> tuple[bytes, int]:
    """Find both parts; return the metadata bytes and where the message starts.

    Only the start of the body is read: the metadata part is small and
    comes first, and the message part's end is found later, on the
    database thread, by :func:`_message_end`.
    """
    body.seek(0)
    head = body.read(_HEAD_MAX)
    dash = b"--" + boundary
    if head.startswith(dash):
        pos = len(dash)
    else:  # A preamble, which multipart allows and ignores.
        found = head.find(b"\r\n" + dash)
        if found < 0:
            raise BadRequest("body: no multipart boundary found")
        pos = found + 2 + len(dash)
    pos = _after_delimiter(head, pos)
    pos = _part_headers(head, pos, "metadata", "application/json")
    end = head.find(b"\r\n" + dash, pos)
    if end < 0:
        raise BadRequest(f"metadata part: unterminated or over {_METADATA_MAX} bytes")
    metadata = head[pos:end]
    if len(metadata) > _METADATA_MAX:
        raise BadRequest(f"metadata part: over {_METADATA_MAX} bytes")
    pos = _after_delimiter(head, end + 2 + len(dash))
    pos = _part_headers(head, pos, "message", "message/rfc822")
    return metadata, pos


def _after_delimiter(head: bytes, pos: int) -> int:
    """Skip the rest of a boundary line that must open another part."""
    if head.startswith(b"--", pos):
        raise BadRequest("body: expected exactly two parts (metadata, message), found fewer")
    eol = head.find(b"\r\n", pos)
    if eol < 0 or head[pos:eol].strip(b" \t"):
        raise BadRequest("body: malformed boundary line")
    return eol + 2


def _part_headers(head: bytes, pos: int, name: str, content_type: str) -> int:
    """Check one part's headers; return where its body starts."""
    where = f"part {name!r}"
    end = head.find(b"\r\n\r\n", pos - 2)
    if end < 0 or end - pos > _PART_HEADERS_MAX:
        raise BadRequest(f"{where}: headers unterminated or too long")
    fields: dict[str, str] = {}
    block = head[pos:end]
    try:
        lines = block.decode("ascii").split("\r\n") if block else []
    except UnicodeDecodeError:
        raise BadRequest(f"{where}: headers must be ASCII") from None
    for line in lines:
        field, colon, value = line.partition(":")
        if not colon or not field or field != field.strip() or field.lower() in fields:
            raise BadRequest(f"{where}: malformed header line {line[:80]!r}")
        fields[field.lower()] = value.strip()
    disposition = HTTP.header_factory("content-disposition", fields.get("content-disposition", ""))
    if (
        not isinstance(disposition, ContentDispositionHeader)
        or disposition.content_disposition != "form-data"
        or disposition.params.get("name") != name
    ):
        raise BadRequest(f'body: expected Content-Disposition: form-data; name="{name}" here')
    ctype = HTTP.header_factory("content-type", fields.get("content-type", "text/plain"))
    if not isinstance(ctype, ContentTypeHeader) or ctype.content_type != content_type:
        raise BadRequest(f"{where}: Content-Type must be {content_type}")
    charset = ctype.params.get("charset")
    if charset is not None and str(charset).lower() not in ("utf-8", "us-ascii"):
        raise BadRequest(f"{where}: charset must be utf-8")
    encoding = fields.get("content-transfer-encoding", "binary").lower()
    if encoding not in ("binary", "8bit", "7bit"):
        raise BadRequest(f"{where}: Content-Transfer-Encoding must be binary")
    return end + 4


def _message_end(body: IO[bytes], start: int, boundary: bytes) -> int:
    """Where the message part ends: right before ``CRLF--boundary--``.

    The boundary cannot occur inside a part, so the first delimiter line
    after the message's start must be the close delimiter; any other is a
    third part.  (A line that merely begins with the boundary, followed by
    more characters, is message content.)
    """
    delimiter = b"\r\n--" + boundary
    pos = start
    while True:
        found = _find(body, delimiter, pos)
        if found < 0:
            raise BadRequest("part 'message': not closed by the final boundary")
        body.seek(found + len(delimiter))
        after = body.read(80)
        if after.startswith(b"--"):
            break
        if after.lstrip(b" \t").startswith(b"\r\n"):
            raise BadRequest("body: expected exactly two parts (metadata, message), found more")
        pos = found + 1
    if found == start:
        raise BadRequest("part 'message': empty")
    return found


def _find(body: IO[bytes], needle: bytes, pos: int) -> int:
    """The offset of ``needle`` in ``body`` from ``pos``, or -1; a chunk at a time.

    So that a many-megabyte message is never held whole.
    """
    keep = len(needle) - 1
    body.seek(pos)
    window = b""  # holds the body's bytes from offset ``pos`` on
    while True:
        chunk = body.read(_CHUNK)
        if not chunk:
            return -1
        window += chunk
        found = window.find(needle)
        if found >= 0:
            return pos + found
        drop = max(0, len(window) - keep)
        pos, window = pos + drop, window[drop:]


# --------------------------------------------------------------------------
# Storage: every function below runs on the database thread.

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

_COLUMNS = (
    "id, idempotency_key, customer, user, mail_from, return_path, rcpt_to, bcc, flags, "
    "bcc_flags, tags, client, message_id, received_at, size, subject"
)
#: How much of a message's start is searched for its Subject field.
_SUBJECT_HEAD = 64 * 1024
#: The longest Subject kept for the reports (a longer one is cut).
_SUBJECT_MAX = 2000


def _connect(database: pathlib.Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE)
    # so that the write lock is taken before the UNIQUE check, not after.
    conn = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a send is durable before its 201, as a 250 promises.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(_SCHEMA)
    _migrate(conn)
    return conn


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


def _insert_recipients(conn: sqlite3.Connection, seq: int, to: str, bcc: str | None) -> None:
    keys = {address_key(to)} | ({address_key(bcc)} if bcc is not None else set())
    conn.executemany(
        "INSERT OR IGNORE INTO send_recipients (address, seq) VALUES (?, ?)",
        [(key, seq) for key in sorted(keys)],
    )


def _subject(head: bytes) -> str | None:
    """The raw (still RFC 2047 encoded) Subject of a message's start, or None."""
    raw = reports.header_field(reports.split_message(head)[0], b"subject")
    return None if raw is None else raw.decode("utf-8", "replace")[:_SUBJECT_MAX]


@attrs.frozen
class _Stored:
    id: str
    duplicate: bool


def _insert_send(
    conn: sqlite3.Connection,
    meta: SendMetadata,
    key: str,
    body: IO[bytes],
    start: int,
    boundary: bytes,
) -> _Stored:
    """Store one send, or find the one stored under the same key.

    The UNIQUE (customer, idempotency_key) constraint is the only arbiter,
    so that two writers (threads or processes) racing with one key store one
    row; the loser learns the winner's id.  The message is copied into a
    zero-filled BLOB of the right size, a chunk at a time.
    """
    try:
        end = _message_end(body, start, boundary)
        size = end - start
        body.seek(start)
        subject = _subject(body.read(min(size, _SUBJECT_HEAD)))
        conn.execute("BEGIN IMMEDIATE")
        try:
            received_at = _received_at(conn)
            cursor = conn.execute(
                f"INSERT INTO sends ({_COLUMNS}, message) "  # noqa: S608 (constant columns)
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, zeroblob(?))",
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
                    size,
                ),
            )
            seq = cursor.lastrowid
            assert seq is not None
            _insert_recipients(conn, seq, meta.to, meta.bcc)
            conn.executemany(
                "INSERT OR IGNORE INTO send_tags (tag, seq) VALUES (?, ?)",
                [(tag, seq) for tag in meta.tags],
            )
            with conn.blobopen("sends", "message", seq) as blob:
                body.seek(start)
                remaining = size
                while remaining:
                    chunk = body.read(min(_CHUNK, remaining))
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
                return _Stored(id=row[0], duplicate=True)
            raise _Conflict(
                f"send id {meta.id!r} is already stored under another Idempotency-Key"
            ) from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return _Stored(id=meta.id, duplicate=False)
    finally:
        body.close()


def _received_at(conn: sqlite3.Connection) -> str:
    """Now, but never before the last stored send's time (inside the write lock).

    So that ``received_at`` never decreases in storage order, even when the
    clock steps back or two processes write: a time range is then one range
    of storage order, found through the index (see :func:`_seq_at`).
    """
    now = _stamp(datetime.datetime.now(datetime.UTC))
    row = conn.execute("SELECT received_at FROM sends ORDER BY seq DESC LIMIT 1").fetchone()
    return now if row is None or row[0] <= now else str(row[0])


def _stamp(when: datetime.datetime) -> str:
    """The stored form of a time: RFC 3339, UTC, microseconds, fixed width.

    Fixed width so that text order is time order, in SQL too.
    """
    utc = when.astimezone(datetime.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def _row_to_send(row: Sequence[Any]) -> StoredSend:
    (send_id, key, customer, user, mail_from, return_path, to, bcc, flags, bcc_flags) = row[:10]
    tags, client, message_id, received_at, size, subject = row[10:]
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
        ),
        idempotency_key=key,
        received_at=received_at,
        size=size,
        subject=subject,
    )


def _select_send(conn: sqlite3.Connection, send_id: str) -> StoredSend | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM sends WHERE id = ?",  # noqa: S608 (constant columns)
        (send_id,),
    ).fetchone()
    return None if row is None else _row_to_send(row)


def _select_message(
    conn: sqlite3.Connection, send_id: str, limit: int | None = None
) -> bytes | None:
    """The stored message, or its first ``limit`` bytes."""
    row = conn.execute("SELECT seq FROM sends WHERE id = ?", (send_id,)).fetchone()
    if row is None:
        return None
    with conn.blobopen("sends", "message", row[0], readonly=True) as blob:
        return blob.read() if limit is None else blob.read(limit)


def _select_send_preview(
    conn: sqlite3.Connection, send_id: str, limit: int
) -> tuple[StoredSend, bytes] | None:
    send = _select_send(conn, send_id)
    if send is None:
        return None
    message = _select_message(conn, send_id, limit)
    return (send, message or b"")


# --------------------------------------------------------------------------
# The reports' list: its query parameters, checked (pure), and the page they
# select (on the database thread).  Paging is by storage order (``seq``),
# which is what "newest first" has always meant here: a send id is minted by
# the relay before the send is stored, so a late retry can store an older id
# after newer ones, and paging by id would slot it into pages already seen.
# By storage order a walk of ``next`` cursors sees every send stored before
# it began exactly once, and nothing stored since.

_LIST_PARAMETERS = ("tag", "limit", "before", "after", "since", "until", "to")
#: The HTML form's fields: left empty, they are absent (any other is an error).
_FORM_FIELDS = frozenset(("tag", "since", "until", "to"))
#: Longer than any address (RFC 5321 allows 256 octets of path).
_ADDRESS_MAX = 320
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
    #: Comparable with ``received_at`` (see :func:`_stamp`).
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
    if len(key) > _ADDRESS_MAX or "@" not in key or not printable:
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
        stored = _stamp(when)
    except (ValueError, OverflowError):
        raise BadRequest(
            f"{name}: must be an RFC 3339 date-time with an offset "
            "(2025-01-02T03:04:05Z, 2025-01-02T05:04:05+02:00) or a date (2025-01-02, UTC)"
        ) from None
    return Instant(text=value, stored=stored)


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
        f"SELECT d.seq, {_COLUMNS} FROM {source}"  # noqa: S608 (constant SQL, values are parameters)
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY d.seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
    )
    return sql, [*params, limit]


def _select_page(conn: sqlite3.Connection, query: SendQuery) -> SendPage:
    """The page ``query`` asks for; :class:`BadRequest` for an unknown cursor."""
    low, high = _seq_at(conn, query.since), _seq_at(conn, query.until)
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
        sends=tuple(_row_to_send(row[1:]) for row in found),
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


def _seq_at(conn: sqlite3.Connection, bound: Instant | None) -> int | None:
    """The first send stored at or after ``bound``, by the received-time index.

    ``received_at`` never decreases in storage order (:func:`_received_at`),
    so every send from this one on is at or after ``bound`` and none before.
    """
    if bound is None:
        return None
    row = conn.execute(
        "SELECT seq FROM sends WHERE received_at >= ? ORDER BY received_at, seq LIMIT 1",
        (bound.stored,),
    ).fetchone()
    return None if row is None else int(row[0])


@attrs.define
class _Database:
    """One SQLite connection, used only from one worker thread.

    SQLite serialises writers anyway; one thread keeps every statement off
    the reactor thread without any locking of our own.
    """

    conn: sqlite3.Connection
    pool: ThreadPool
    #: The reactor: IReactorCore and IReactorFromThreads, which no one type says.
    reactor: Any

    def run(
        self,
        f: Callable[Concatenate[sqlite3.Connection, _P], _R],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> Deferred[_R]:
        return deferToThreadPool(self.reactor, self.pool, f, self.conn, *args, **kwargs)


# --------------------------------------------------------------------------
# HTTP


class _Request(Protocol):
    """The part of ``twisted.web.server.Request`` used here, typed.

    Twisted's own methods are not annotated, so calls on them would go
    unchecked; the resources below take this instead.
    """

    method: bytes
    args: dict[bytes, list[bytes]] | None
    postpath: list[bytes] | None
    content: IO[bytes] | None

    def getHeader(self, key: bytes) -> bytes | None: ...
    def setHeader(self, name: bytes, value: bytes) -> None: ...
    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def notifyFinish(self) -> Deferred[None]: ...


@attrs.frozen
class _Response:
    status: int
    body: bytes
    content_type: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def render(self, request: _Request) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", self.content_type)
        # Also for responses written later, so they are not sent chunked.
        request.setHeader(b"Content-Length", b"%d" % len(self.body))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", reports.CONTENT_SECURITY_POLICY)
        for name, value in self.headers:
            request.setHeader(name, value)
        return self.body


def _json(status: int, obj: Mapping[str, Any], *headers: tuple[bytes, bytes]) -> _Response:
    body = json.dumps(obj).encode("ascii") + b"\n"
    return _Response(status, body, b"application/json", headers)


def _error(status: int, message: str, *headers: tuple[bytes, bytes]) -> _Response:
    return _json(status, {"error": message}, *headers)


def _html(status: int, body: bytes) -> _Response:
    return _Response(status, body, b"text/html; charset=utf-8")


def _html_error(status: int, message: str) -> _Response:
    return _html(status, reports.render_error(status, message))


def _later(request: _Request, result: Deferred[_Response]) -> int:
    """Write the response ``result`` fires with, unless the client has gone."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def write(response: _Response) -> None:
        if not gone:
            request.write(response.render(request))
            request.finish()

    def failed(failure: Failure) -> _Response:
        _log.failure("reference API request failed", failure)
        return _error(500, "internal error")

    result.addErrback(failed).addCallback(write).addErrback(
        lambda f: _log.failure("could not write a response", f)
    )
    return NOT_DONE_YET


class _Resource(Resource):
    """Dispatch on the method, answering other methods with a 405 of our own.

    ``twisted.web``'s 405 is an HTML page; the API's clients expect JSON.
    """

    html = False

    def __init__(self) -> None:
        Resource.__init__(self)

    def handlers(self) -> Mapping[bytes, Callable[[_Request], bytes | int]]:
        return {}

    def render(self, request: _Request) -> bytes | int:
        handlers = self.handlers()
        method = request.method
        handler = handlers.get(b"GET" if method == b"HEAD" else method)
        if handler is None:
            allow = b", ".join(sorted({*handlers, b"HEAD"} if b"GET" in handlers else handlers))
            message = f"method not allowed here; use {allow.decode()}"
            response = _html_error(405, message) if self.html else _error(405, message)
            return attrs.evolve(response, headers=((b"Allow", allow),)).render(request)
        return handler(request)


class _NotFound(_Resource):
    isLeaf = True

    def __init__(self, html: bool) -> None:
        super().__init__()
        self.html = html

    def render(self, request: _Request) -> bytes:
        if self.html:
            return _html_error(404, "no such page").render(request)
        return _error(404, "not found").render(request)


@attrs.define(eq=False)
class _Config:
    db: _Database
    token: bytes
    max_body: int


def _list_query(request: _Request) -> SendQuery:
    return SendQuery.from_args(request.args or {})


def _bad_cursor(failure: Failure, render: Callable[[int, str], _Response]) -> _Response | Failure:
    """An unknown ``before``/``after`` id is found out on the database thread."""
    if isinstance(failure.value, BadRequest):
        return render(400, str(failure.value))
    return failure


class _Sends(_Resource):
    """``/v1/sends``: POST one send (the relay), GET the list (reports)."""

    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.config = config

    def handlers(self) -> Mapping[bytes, Callable[[_Request], bytes | int]]:
        return {b"GET": self.list_sends, b"POST": self.create_send}

    def getChild(self, path: bytes, request: _Request) -> Resource:
        if path == b"":
            return self
        send_id = path.decode("ascii", "replace")
        if SEND_ID.fullmatch(send_id):
            return _Send(self.config, send_id)
        return _NotFound(html=False)

    def list_sends(self, request: _Request) -> bytes | int:
        try:
            query = _list_query(request)
        except BadRequest as e:
            return _error(400, str(e)).render(request)
        d = self.config.db.run(_select_page, query).addCallbacks(
            lambda page: _json(200, page.to_json()), _bad_cursor, errbackArgs=(_error,)
        )
        return _later(request, d)

    def create_send(self, request: _Request) -> bytes | int:
        config = self.config
        if not _authorised(request, config.token):
            return self._unauthorised(request).render(request)
        body = request.content
        assert body is not None
        body.seek(0, io.SEEK_END)
        length = request.getHeader(b"content-length")
        if body.tell() > config.max_body or (
            length is not None and length.isdigit() and int(length) > config.max_body
        ):
            return _error(413, f"body over {config.max_body} bytes").render(request)
        key = (request.getHeader(b"idempotency-key") or b"").decode("latin-1")
        if not IDEMPOTENCY_KEY.fullmatch(key):
            return _error(
                400, "Idempotency-Key: required, 1 to 128 characters of [A-Za-z0-9_-]"
            ).render(request)
        try:
            boundary = _boundary(request.getHeader(b"content-type"))
            raw, start = _parse_head(body, boundary)
            meta = SendMetadata.from_json(raw)
        except BadRequest as e:
            return _error(400, str(e)).render(request)
        # The spooled body is now the database thread's (it closes it), so
        # that twisted.web's clean-up after a lost connection cannot close
        # it under the copy.
        request.content = io.BytesIO()
        d = config.db.run(_insert_send, meta, key, body, start, boundary)

        def stored(s: _Stored) -> _Response:
            location = (b"Location", f"/v1/sends/{s.id}".encode("ascii"))
            if s.duplicate:
                return _json(200, {"id": s.id, "duplicate": True}, location)
            return _json(201, {"id": s.id}, location)

        def refused(f: Failure) -> _Response | Failure:
            if isinstance(f.value, BadRequest):
                return _error(400, str(f.value))
            if isinstance(f.value, _Conflict):
                return _error(409, str(f.value))
            return f

        return _later(request, d.addCallbacks(stored, refused))

    @staticmethod
    def _unauthorised(request: _Request) -> _Response:
        challenge = b'Bearer realm="mxmrelay"'
        if request.getHeader(b"authorization") is not None:
            challenge += b', error="invalid_token"'
        return _error(401, "a valid bearer token is required", (b"WWW-Authenticate", challenge))


def _authorised(request: _Request, token: bytes) -> bool:
    header = request.getHeader(b"authorization") or b""
    scheme, _, credentials = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    # Constant time in the token's content, so it cannot be guessed bytewise.
    return hmac.compare_digest(credentials.strip(), token)


class _OneSend(_Resource):
    """A read-only view of one send: the JSON, the raw message, the page."""

    def __init__(self, config: _Config, send_id: str) -> None:
        super().__init__()
        self.config = config
        self.send_id = send_id

    def handlers(self) -> Mapping[bytes, Callable[[_Request], bytes | int]]:
        return {b"GET": self.get}

    def get(self, request: _Request) -> bytes | int:
        raise NotImplementedError


class _Send(_OneSend):
    """``/v1/sends/{id}`` and its ``message`` child."""

    def getChild(self, path: bytes, request: _Request) -> Resource:
        if path == b"message":
            return _Message(self.config, self.send_id)
        if path == b"":
            return self
        return _NotFound(html=False)

    def get(self, request: _Request) -> bytes | int:
        def found(send: StoredSend | None) -> _Response:
            if send is None:
                return _error(404, f"no send {self.send_id!r}")
            return _json(200, send.to_json())

        return _later(request, self.config.db.run(_select_send, self.send_id).addCallback(found))


class _Message(_OneSend):
    isLeaf = True

    def get(self, request: _Request) -> bytes | int:
        if request.postpath:
            return _error(404, "not found").render(request)

        def found(message: bytes | None) -> _Response:
            if message is None:
                return _error(404, f"no send {self.send_id!r}")
            filename = f'attachment; filename="{self.send_id}.eml"'.encode("ascii")
            # A hostile message must never be rendered as a page of ours.
            return _Response(
                200,
                message,
                b"message/rfc822",
                ((b"Content-Disposition", filename), (b"Content-Security-Policy", b"sandbox")),
            )

        d = self.config.db.run(_select_message, self.send_id)
        return _later(request, d.addCallback(found))


class _Index(_Resource):
    """``/``: the sends, newest first, with the list's filters and paging."""

    html = True
    isLeaf = True

    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.config = config

    def handlers(self) -> Mapping[bytes, Callable[[_Request], bytes | int]]:
        return {b"GET": self.get}

    def get(self, request: _Request) -> bytes | int:
        if request.postpath:
            return _html_error(404, "no such page").render(request)
        try:
            query = _list_query(request)
        except BadRequest as e:
            return _html_error(400, str(e)).render(request)
        d = self.config.db.run(_select_page, query).addCallbacks(
            lambda page: _html(200, reports.render_index(page, query)),
            _bad_cursor,
            errbackArgs=(_html_error,),
        )
        return _later(request, d)


class _SendPages(_Resource):
    """``/sends/{id}``: one send for people."""

    html = True

    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.config = config

    def getChild(self, path: bytes, request: _Request) -> Resource:
        send_id = path.decode("ascii", "replace")
        if SEND_ID.fullmatch(send_id) and not request.postpath:
            return _SendPage(self.config, send_id)
        return _NotFound(html=True)

    def render(self, request: _Request) -> bytes | int:
        return _NotFound(html=True).render(request)


class _SendPage(_OneSend):
    html = True
    isLeaf = True

    def get(self, request: _Request) -> bytes | int:
        def found(result: tuple[StoredSend, bytes] | None) -> _Response:
            if result is None:
                return _html_error(404, f"no send {self.send_id}")
            return _html(200, reports.render_send(*result))

        d = self.config.db.run(_select_send_preview, self.send_id, reports.PREVIEW_BYTES)
        return _later(request, d.addCallback(found))


class _Directory(_Resource):
    """A path segment with fixed children: ``/`` (HTML) and ``/v1`` (JSON).

    Unknown children get our 404 (JSON under ``/v1``), not twisted.web's.
    """

    def __init__(self, html: bool) -> None:
        super().__init__()
        self.html = html

    def getChild(self, path: bytes, request: _Request) -> Resource:
        return _NotFound(html=self.html)

    def render(self, request: _Request) -> bytes | int:
        return _NotFound(html=self.html).render(request)


class _CappedRequest(Request):
    """A request that spools at most ``max_body + 1`` bytes of its body.

    Enough for the resource to see the body is too large (413) without
    letting a client fill the disk; the rest is read and dropped.
    """

    def __init__(self, *args: Any, max_body: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._room = max_body + 1

    def handleContentChunk(self, data: bytes) -> None:
        if self._room > 0:
            super().handleContentChunk(data[: self._room])
            self._room -= len(data)


@attrs.define
class ReferenceAPI:
    """The reference delivery API, ready to be served.

    Build it with :meth:`open`; serve :meth:`site` (or :attr:`resource`);
    call :meth:`close` when done.
    """

    resource: IResource
    max_body: int
    _db: _Database
    _shutdown: Any = None

    @classmethod
    def open(
        cls, database: pathlib.Path, token: str, *, max_body: int = DEFAULT_MAX_BODY
    ) -> ReferenceAPI:
        """Open (creating if needed) the database and build the resource tree.

        The schema is created here, synchronously, so that a bad path fails
        at start-up rather than at the first send.
        """
        from twisted.internet import reactor

        if not token:
            raise ValueError("the bearer token must not be empty")
        conn = _connect(database)
        pool = ThreadPool(minthreads=1, maxthreads=1, name="mxmrelay-refapi-sqlite")
        pool.start()
        db = _Database(conn=conn, pool=pool, reactor=reactor)
        config = _Config(db=db, token=token.encode("utf-8"), max_body=max_body)
        v1 = _Directory(html=False)
        v1.putChild(b"sends", _Sends(config))
        root = _Directory(html=True)
        root.putChild(b"", _Index(config))
        root.putChild(b"v1", v1)
        root.putChild(b"sends", _SendPages(config))
        api = cls(resource=root, max_body=max_body, db=db)
        # A forgotten close() must not keep the process alive: the worker
        # thread is not a daemon.
        api._shutdown = reactor.addSystemEventTrigger("during", "shutdown", api._shutting_down)
        return api

    def site(self) -> Site:
        """A ``Site`` for :attr:`resource` that leaves bodies to it.

        It turns off ``twisted.web``'s own multipart parsing and caps how
        much of a body is spooled (see the module docstring).
        """
        factory = functools.partial(_CappedRequest, max_body=self.max_body)
        site: Site = Site(self.resource, requestFactory=factory, parsePOSTFormSubmission=False)
        return site

    def _shutting_down(self) -> None:
        self._shutdown = None  # It is running: there is nothing to remove.
        self.close()

    def close(self) -> None:
        """Stop the worker thread (after its current job) and close the database."""
        if self._shutdown is not None:
            trigger, self._shutdown = self._shutdown, None
            self._db.reactor.removeSystemEventTrigger(trigger)
        if self._db.pool.started:
            self._db.pool.stop()
            self._db.conn.close()
