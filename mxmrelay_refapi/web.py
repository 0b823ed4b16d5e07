"""The HTTP face of the reference API: klein routes over storage.

``POST /v1/sends`` takes a send from the relay; every GET is a report, as
JSON under ``/v1`` and as HTML for people under ``/`` and ``/sends/{id}``.
Errors are the contract's: JSON ``{"error": ...}`` under ``/v1`` (also a 404
or 405 from routing, which klein would otherwise answer with werkzeug's HTML),
an HTML page elsewhere.

Security: only ``POST /v1/sends`` needs the bearer token.  The reports need
none, and they show whole messages, so bind this to loopback or put it
behind an authenticating proxy.
"""

from __future__ import annotations

import hmac
import io
import json
from collections.abc import Mapping
from typing import IO, Any, Protocol

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mxmrelay_refapi import multipart, refusals, reports
from mxmrelay_refapi.contract import IDEMPOTENCY_KEY, SEND_ID, BadRequest, SendMetadata
from mxmrelay_refapi.pages import select_page
from mxmrelay_refapi.query import SendQuery
from mxmrelay_refapi.storage import (
    Conflict,
    Database,
    insert_send,
    select_message,
    select_send,
    select_send_preview,
)
from mxmrelay_refapi.users import Users

__all__ = ["DEFAULT_MAX_BODY", "Routes"]

DEFAULT_MAX_BODY = 60 * 1024 * 1024
"""The largest request body accepted, in bytes (413 above it)."""
MAX_REFUSALS_BODY = 16 * 1024 * 1024
"""The largest batch of refusals accepted, in bytes."""

_log = Logger()


class _Request(Protocol):
    """The part of ``twisted.web.server.Request`` used here, typed.

    Twisted's own methods are not annotated, so calls on them would go
    unchecked; the routes take this instead.
    """

    method: bytes
    path: bytes
    args: dict[bytes, list[bytes]] | None
    content: IO[bytes] | None

    def getHeader(self, key: bytes) -> bytes | None: ...
    def setHeader(self, name: bytes, value: bytes) -> None: ...
    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...


@attrs.frozen
class Response:
    """A whole response, written by :meth:`render` (which returns the body)."""

    status: int
    body: bytes
    content_type: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def render(self, request: _Request) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", self.content_type)
        # So that a response written after a database call is not chunked.
        request.setHeader(b"Content-Length", b"%d" % len(self.body))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", reports.CONTENT_SECURITY_POLICY)
        for name, value in self.headers:
            request.setHeader(name, value)
        return self.body


def json_response(status: int, obj: Mapping[str, Any], *headers: tuple[bytes, bytes]) -> Response:
    body = json.dumps(obj).encode("ascii") + b"\n"
    return Response(status, body, b"application/json", headers)


def error(request: _Request, status: int, message: str, *headers: tuple[bytes, bytes]) -> bytes:
    """An error in the form the path's clients read: JSON under ``/v1``, else HTML."""
    if request.path == b"/v1" or request.path.startswith(b"/v1/"):
        return json_response(status, {"error": message}, *headers).render(request)
    page = reports.render_error(status, message)
    return Response(status, page, b"text/html; charset=utf-8", headers).render(request)


def _html(request: _Request, page: bytes) -> bytes:
    return Response(200, page, b"text/html; charset=utf-8").render(request)


@attrs.define(slots=False)  # klein binds its router to the instance's __dict__.
class Routes:
    """The routes, bound to one database, bearer token and body limit."""

    db: Database
    token: bytes
    max_body: int = DEFAULT_MAX_BODY
    #: The platform's customer users (``GET /v1/smtp-users/{email}``), if served.
    users: Users | None = None
    app = Klein()

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    # -- the relay's side ---------------------------------------------------

    @app.route("/v1/sends", methods=["POST"], strict_slashes=False)
    async def create_send(self, request: _Request) -> bytes:
        if not _authorised(request, self.token):
            challenge = b'Bearer realm="mxmrelay"'
            if request.getHeader(b"authorization") is not None:
                challenge += b', error="invalid_token"'
            return error(request, 401, "a valid bearer token is required",
                         (b"WWW-Authenticate", challenge))
        body = request.content
        assert body is not None
        body.seek(0, io.SEEK_END)
        length = request.getHeader(b"content-length")
        if body.tell() > self.max_body or (
            length is not None and length.isdigit() and int(length) > self.max_body
        ):
            return error(request, 413, f"body over {self.max_body} bytes")
        key = (request.getHeader(b"idempotency-key") or b"").decode("latin-1")
        if not IDEMPOTENCY_KEY.fullmatch(key):
            raise BadRequest("Idempotency-Key: required, 1 to 128 characters of [A-Za-z0-9_-]")
        boundary = multipart.boundary(request.getHeader(b"content-type"))
        raw, start = multipart.parse_head(body, boundary)
        meta = SendMetadata.from_json(raw)
        # The spooled body is now the database thread's (it closes it), so
        # that twisted.web's clean-up after a lost connection cannot close
        # it under the copy.
        request.content = io.BytesIO()
        stored = await self.db.run(insert_send, meta, key, body, start, boundary)
        location = (b"Location", f"/v1/sends/{stored.id}".encode("ascii"))
        if stored.duplicate:
            return json_response(200, {"id": stored.id, "duplicate": True}, location).render(
                request)
        return json_response(201, {"id": stored.id}, location).render(request)

    @app.route("/v1/smtp-users/<email>", methods=["GET"])
    def get_smtp_user(self, request: _Request, email: str) -> bytes:
        # The answers carry password hashes: the token is required here too.
        if not _authorised(request, self.token):
            return error(request, 401, "a valid bearer token is required",
                         (b"WWW-Authenticate", b'Bearer realm="mxmrelay"'))
        user = self.users.find(email) if self.users is not None else None
        if user is None:
            return error(request, 404, "no such user")
        return json_response(200, user).render(request)

    @app.route("/v1/refusals", methods=["POST"], strict_slashes=False)
    async def create_refusals(self, request: _Request) -> bytes:
        if not _authorised(request, self.token):
            return error(request, 401, "a valid bearer token is required",
                         (b"WWW-Authenticate", b'Bearer realm="mxmrelay"'))
        body = request.content
        assert body is not None
        body.seek(0)
        raw = body.read(MAX_REFUSALS_BODY + 1)
        if len(raw) > MAX_REFUSALS_BODY:
            return error(request, 413, f"body over {MAX_REFUSALS_BODY} bytes")
        records = refusals.parse_refusals(raw)
        stored = await self.db.run(refusals.insert_refusals, records)
        return json_response(201, {"stored": stored}).render(request)

    @app.route("/v1/refusals", methods=["GET"], strict_slashes=False)
    async def list_refusals(self, request: _Request) -> bytes:
        query = refusals.RefusalQuery.from_args(request.args or {})
        found = await self.db.run(refusals.select_refusals, query)
        return json_response(200, {"refusals": found}).render(request)

    @app.route("/refusals", methods=["GET"])
    async def refusals_page(self, request: _Request) -> bytes:
        query = refusals.RefusalQuery.from_args(request.args or {})
        found = await self.db.run(refusals.select_refusals, query)
        return _html(request, reports.render_refusals_page(
            refusals.render_refusals(found, query)))

    # -- the reports, JSON --------------------------------------------------

    @app.route("/v1/sends", methods=["GET"], strict_slashes=False)
    async def list_sends(self, request: _Request) -> bytes:
        query = SendQuery.from_args(request.args or {})
        page = await self.db.run(select_page, query)
        return json_response(200, page.to_json()).render(request)

    @app.route("/v1/sends/<send_id>", methods=["GET"])
    async def get_send(self, request: _Request, send_id: str) -> bytes:
        send = await self.db.run(select_send, send_id) if SEND_ID.fullmatch(send_id) else None
        if send is None:
            return error(request, 404, f"no send {send_id!r}")
        return json_response(200, send.to_json()).render(request)

    @app.route("/v1/sends/<send_id>/message", methods=["GET"])
    async def get_message(self, request: _Request, send_id: str) -> bytes:
        found = SEND_ID.fullmatch(send_id)
        message = await self.db.run(select_message, send_id) if found else None
        if message is None:
            return error(request, 404, f"no send {send_id!r}")
        filename = f'attachment; filename="{send_id}.eml"'.encode("ascii")
        # A hostile message must never be rendered as a page of ours.
        headers = ((b"Content-Disposition", filename), (b"Content-Security-Policy", b"sandbox"))
        return Response(200, message, b"message/rfc822", headers).render(request)

    # -- the reports, HTML --------------------------------------------------

    @app.route("/", methods=["GET"])
    async def index(self, request: _Request) -> bytes:
        query = SendQuery.from_args(request.args or {})
        page = await self.db.run(select_page, query)
        # The refused transactions beside the sends, for the same time range.
        refused_query = refusals.RefusalQuery(since=query.since, until=query.until, limit=20)
        refused = await self.db.run(refusals.select_refusals, refused_query)
        beside = refusals.render_refusals(refused, refused_query)
        return _html(request, reports.render_index(page, query, beside))

    @app.route("/sends/<send_id>", methods=["GET"])
    async def send_page(self, request: _Request, send_id: str) -> bytes:
        found = None
        if SEND_ID.fullmatch(send_id):
            found = await self.db.run(select_send_preview, send_id, reports.PREVIEW_BYTES)
        if found is None:
            return error(request, 404, f"no send {send_id}")
        return _html(request, reports.render_send(*found))

    # -- errors -------------------------------------------------------------

    @app.handle_errors(BadRequest)
    def bad_request(self, request: _Request, failure: Failure) -> bytes:
        return error(request, 400, str(failure.value))

    @app.handle_errors(Conflict)
    def conflict(self, request: _Request, failure: Failure) -> bytes:
        return error(request, 409, str(failure.value))

    @app.handle_errors(NotFound)
    def not_found(self, request: _Request, failure: Failure) -> bytes:
        return error(request, 404, "not found" if request.path.startswith(b"/v1") else
                     "no such page")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: _Request, failure: Failure) -> bytes:
        assert isinstance(failure.value, MethodNotAllowed)
        allow = ", ".join(sorted(failure.value.valid_methods or ()))
        return error(request, 405, f"method not allowed here; use {allow}",
                     (b"Allow", allow.encode("ascii")))

    @app.handle_errors(Exception)
    def failed(self, request: _Request, failure: Failure) -> bytes | None:
        if failure.check(CancelledError):  # The client went away.
            return None
        _log.failure("reference API request failed", failure)
        return error(request, 500, "internal error")


def _authorised(request: _Request, token: bytes) -> bool:
    header = request.getHeader(b"authorization") or b""
    scheme, _, credentials = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    # Constant time in the token's content, so it cannot be guessed bytewise.
    return hmac.compare_digest(credentials.strip(), token)
