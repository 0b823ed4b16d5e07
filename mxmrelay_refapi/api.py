"""The reference delivery API, ready to be served: storage, routes, site.

Serve it with :meth:`ReferenceAPI.site`, not a plain ``Site(api.resource)``:
by default ``twisted.web`` parses every ``multipart/form-data`` body into
``request.args`` (reading the whole body into memory again, and answering a
non-JSON 400 itself when the parse fails) and spools bodies of any size to
disk.  The resource works under a plain ``Site`` too, only at that cost.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import attrs
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mxmrelay_refapi.storage import Database
from mxmrelay_refapi.users import Users
from mxmrelay_refapi.web import DEFAULT_MAX_BODY, Routes

__all__ = ["DEFAULT_MAX_BODY", "ReferenceAPI"]


class _CappedRequest(Request):
    """A request that spools at most ``max_body + 1`` bytes of its body.

    Enough for the routes to see the body is too large (413) without
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
    """The reference delivery API: build it with :meth:`open`, serve
    :meth:`site` (or :attr:`resource`), :meth:`close` it when done."""

    resource: IResource
    max_body: int
    db: Database
    _reactor: Any
    _shutdown: Any = None

    @classmethod
    def open(
        cls,
        database: pathlib.Path,
        token: str,
        *,
        reactor: Any,
        max_body: int = DEFAULT_MAX_BODY,
        directory: pathlib.Path | None = None,
    ) -> ReferenceAPI:
        """Open (creating or upgrading) the database and build the routes.

        The schema is made here, synchronously, so that a bad path fails at
        start-up rather than at the first send.  ``reactor`` runs the
        database thread's results and, at its shutdown, closes it all: a
        forgotten :meth:`close` must not keep the process alive (the worker
        thread is not a daemon).  ``directory``: a directory TOML file whose
        users ``GET /v1/smtp-users/{email}`` serves (read here: a file that
        does not read stops start-up).
        """
        if not token:
            raise ValueError("the bearer token must not be empty")
        users = Users.open(directory) if directory is not None else None
        db = Database.threaded(database, reactor)
        routes = Routes(db=db, token=token.encode("utf-8"), max_body=max_body, users=users)
        api = cls(resource=routes.resource(), max_body=max_body, db=db, reactor=reactor)
        api._shutdown = reactor.addSystemEventTrigger("during", "shutdown", api._shutting_down)
        return api

    def site(self) -> Site:
        """A ``Site`` for :attr:`resource` that leaves bodies to it (see the
        module docstring)."""
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
            self._reactor.removeSystemEventTrigger(trigger)
        self.db.close()
