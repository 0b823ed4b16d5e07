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
    "ReferenceAPI",
    "SendMetadata",
    "StoredSend",
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
PRAGMA user_version = 1;
"""

_COLUMNS = (
    "id, idempotency_key, customer, user, mail_from, return_path, rcpt_to, bcc, flags, "
    "bcc_flags, tags, client, message_id, received_at, size"
)


def _connect(database: pathlib.Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE)
    # so that the write lock is taken before the UNIQUE check, not after.
    conn = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a send is durable before its 201, as a 250 promises.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(_SCHEMA)
    return conn


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
        received_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                f"INSERT INTO sends ({_COLUMNS}, message) "  # noqa: S608 (constant columns)
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, zeroblob(?))",
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
                    size,
                ),
            )
            seq = cursor.lastrowid
            assert seq is not None
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


def _row_to_send(row: Sequence[Any]) -> StoredSend:
    (send_id, key, customer, user, mail_from, return_path, to, bcc, flags, bcc_flags) = row[:10]
    tags, client, message_id, received_at, size = row[10:]
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
    )


def _select_sends(conn: sqlite3.Connection, tags: Sequence[str], limit: int) -> list[StoredSend]:
    # One sub-select per tag: a send matches only when it has every tag.
    where = " AND ".join("seq IN (SELECT seq FROM send_tags WHERE tag = ?)" for _ in tags)
    sql = (
        f"SELECT {_COLUMNS} FROM sends "  # noqa: S608 (constant SQL, values are parameters)
        + (f"WHERE {where} " if where else "")
        + "ORDER BY seq DESC LIMIT ?"
    )
    return [_row_to_send(row) for row in conn.execute(sql, (*tags, limit))]


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


def _query_limit(request: _Request) -> int:
    values = (request.args or {}).get(b"limit", [])
    if not values:
        return DEFAULT_LIMIT
    if len(values) > 1:
        raise BadRequest("limit: give it once")
    value = values[0]
    if not value.isdigit() or len(value) > 4 or not 1 <= int(value) <= MAX_LIMIT:
        raise BadRequest(f"limit: must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


def _query_tags(request: _Request) -> list[str]:
    """The ``tag`` filters; empty ones (an unused form field) are ignored."""
    try:
        tags = [t.decode("utf-8") for t in (request.args or {}).get(b"tag", []) if t]
    except UnicodeDecodeError:
        raise BadRequest("tag: must be UTF-8") from None
    if len(tags) > MAX_TAG_FILTERS:
        raise BadRequest(f"tag: at most {MAX_TAG_FILTERS} tags")
    return list(dict.fromkeys(tags))


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
            tags, limit = _query_tags(request), _query_limit(request)
        except BadRequest as e:
            return _error(400, str(e)).render(request)
        d = self.config.db.run(_select_sends, tags, limit)
        return _later(
            request, d.addCallback(lambda s: _json(200, {"sends": [x.to_json() for x in s]}))
        )

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
    """``/``: the sends, newest first, with a tag filter."""

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
            tags, limit = _query_tags(request), _query_limit(request)
        except BadRequest as e:
            return _html_error(400, str(e)).render(request)
        d = self.config.db.run(_select_sends, tags, limit)
        return _later(
            request, d.addCallback(lambda s: _html(200, reports.render_index(s, tags, limit)))
        )


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
