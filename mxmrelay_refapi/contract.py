"""The delivery API contract, v1: what a send's metadata must be.

This is the reference API's reading of ``docs/delivery-api.yaml``, written
from the document and not from the relay: the API exists to catch a
forwarder that drifts from the contract, so it must not share the relay's
code or constants (``tests/test_refapi_contract.py`` checks that every
limit here is the document's, and no other).

Validation is strict (every key present, no unknown key) because a future
contract bumps ``version`` instead of adding keys silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "IDEMPOTENCY_KEY",
    "MAX_FLAGS",
    "SEND_ID",
    "BadRequest",
    "ClientInfo",
    "SendMetadata",
    "StoredSend",
]

#: ``#/components/schemas/SendId``.
SEND_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: The ``Idempotency-Key`` header's parameter schema.
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: ``#/components/schemas/Flags``: the four X-Mxm-Flags bits.
MAX_FLAGS = 15
#: ``SendMetadata.version``.
VERSION = 1

_METADATA_KEYS = frozenset(
    "version id customer user mail_from return_path to bcc flags bcc_flags tags client "
    "message_id".split()
)
_CLIENT_KEYS = frozenset(("address", "tls_version", "listener"))
#: Keys a send's metadata may leave out: ``sandbox`` is there only when true.
_OPTIONAL_KEYS = frozenset(("sandbox",))


class BadRequest(Exception):
    """The request is malformed; the message says why (sent as the 400 body)."""


@attrs.frozen
class ClientInfo:
    """Where the relay got the message from (reported, never interpreted)."""

    address: str
    tls_version: str | None
    listener: str

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "tls_version": self.tls_version, "listener": self.listener}


@attrs.frozen
class SendMetadata:
    """The metadata part of a v1 send, validated."""

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
    #: A sandbox send: stored and shown, never delivered, never tracked.
    sandbox: bool = False

    @classmethod
    def from_json(cls, raw: bytes) -> SendMetadata:
        """Parse and validate the metadata part; raise :class:`BadRequest`."""
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"metadata is not valid JSON: {e}") from None
        obj = _object(data, "metadata", _METADATA_KEYS, _OPTIONAL_KEYS)
        sandbox = obj.get("sandbox", False)
        if sandbox is not True and "sandbox" in obj:
            raise BadRequest("metadata.sandbox: must be true when present")
        if _integer(obj["version"]) != VERSION:
            raise BadRequest(f"metadata.version: must be {VERSION}")
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
            sandbox=sandbox,
        )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _integer(value: Any) -> int | None:
    """A JSON integer as JSON Schema counts them (``3.0`` is one), else None.

    Booleans are not numbers in JSON, whatever Python thinks.
    """
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _object(value: Any, where: str, keys: frozenset[str],
            optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: must be a JSON object")
    missing = sorted(keys - value.keys())
    if missing:
        raise BadRequest(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(value.keys() - keys - optional)
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
    flags = _integer(value)
    if flags is None or not 0 <= flags <= MAX_FLAGS:
        ornull = " or null" if nullable else ""
        raise BadRequest(f"metadata.{key}: must be an integer from 0 to {MAX_FLAGS}{ornull}")
    return flags


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
    #: A sandbox send's header section as the client submitted it.
    submitted_headers: bytes | None = None

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
            "sandbox": m.sandbox,
        }
