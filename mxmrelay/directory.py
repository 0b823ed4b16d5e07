"""The customer directory: customer spaces, their senders, and their users.

The SMTP code only ever talks to :class:`IDirectory`, so that a backend
other than the TOML file (the platform's own HTTP API, say) can be added
without touching the protocol.  Lookups return Deferreds for that reason,
even though the TOML backend answers at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

from mxmrelay.config import read_toml

#: The bits an ``X-Mxm-Flags`` value may carry (1|2|4|8).
MAX_FLAGS = 15


@attrs.frozen
class CustomerSpace:
    """One customer space, as the rules need it (pure data, no I/O)."""

    id: str
    name: str
    #: Allowed sender domains, lower-case, IDNA/ASCII form where possible.
    domains: frozenset[str]
    #: The space's default X-Mxm-Flags value.
    default_flags: int = 0
    #: Per-from-address default flags; keys are lower-cased addresses.
    from_flags: Mapping[str, int] = attrs.field(factory=dict)
    #: Whether ``sub.example.com`` matches an allowed ``example.com``.
    allow_subdomains: bool = False

    def owns(self, address: str) -> bool:
        """Is the domain of ``address`` one this space may send from?"""
        _, at, domain = address.rpartition("@")
        if not at:
            return False
        domain = normalise_domain(domain)
        if domain in self.domains:
            return True
        if self.allow_subdomains:
            return any(domain.endswith("." + d) for d in self.domains)
        return False

    def flags_for(self, sender: str) -> int:
        """The default flags for ``sender``: per-address first, then space."""
        return self.from_flags.get(sender.lower(), self.default_flags)


@attrs.frozen
class User:
    """A customer-level user who may authenticate to submit mail."""

    email: str
    password_hash: str
    customer: CustomerSpace


class DirectoryError(Exception):
    """The directory could not answer (a temporary failure, not a 'no')."""


class InvalidDirectory(Exception):
    """The directory file is invalid; the message names file, key, reason."""


class IDirectory(Interface):
    """Where users and their customer spaces are looked up."""

    def find_user(email: str) -> Deferred[User | None]:
        """The user with this (case-insensitive) address, or None.

        Errbacks with :class:`DirectoryError` when the backend is down.
        """


def normalise_domain(domain: str) -> str:
    """Lower-case a domain and turn a U-label into its A-label form."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


@implementer(IDirectory)
@attrs.frozen
class TomlDirectory:
    """A directory loaded once, at start, from a TOML file."""

    users: Mapping[str, User]
    spaces: Mapping[str, CustomerSpace]

    def find_user(self, email: str) -> Deferred[User | None]:
        return succeed(self.users.get(email.lower()))

    @classmethod
    def from_file(cls, path: Path) -> TomlDirectory:
        return cls.from_dict(read_toml(path, InvalidDirectory), str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TomlDirectory:
        def bad(key: str, reason: str) -> InvalidDirectory:
            return InvalidDirectory(f"{where}: {key}: {reason}")

        spaces: dict[str, CustomerSpace] = {}
        for i, c in enumerate(_table_list(data, "customer", where)):
            key = f"customer[{i}]"
            cid = _string(c, "id", key, where)
            if cid in spaces:
                raise bad(f"{key}.id", f"duplicate customer space {cid!r}")
            domains = c.get("domains")
            if not isinstance(domains, list) or not domains or not all(
                isinstance(d, str) and d.strip() for d in domains
            ):
                raise bad(f"{key}.domains", "must be a non-empty list of domain names")
            flags = _flags(c.get("flags", 0), f"{key}.flags", where)
            from_flags_raw = c.get("from_flags", {})
            if not isinstance(from_flags_raw, dict):
                raise bad(f"{key}.from_flags", "must be a table of address = flags")
            from_flags = {
                str(addr).lower(): _flags(v, f"{key}.from_flags.{addr}", where)
                for addr, v in from_flags_raw.items()
            }
            allow_sub = c.get("allow_subdomains", False)
            if not isinstance(allow_sub, bool):
                raise bad(f"{key}.allow_subdomains", "must be true or false")
            spaces[cid] = CustomerSpace(
                id=cid,
                name=str(c.get("name", cid)),
                domains=frozenset(normalise_domain(d) for d in domains),
                default_flags=flags,
                from_flags=from_flags,
                allow_subdomains=allow_sub,
            )
        users: dict[str, User] = {}
        for i, u in enumerate(_table_list(data, "user", where)):
            key = f"user[{i}]"
            email = _string(u, "email", key, where)
            if "@" not in email:
                raise bad(f"{key}.email", "must be an email address")
            pw = _string(u, "password", key, where)
            if not pw.startswith("scrypt$"):
                raise bad(
                    f"{key}.password",
                    "must be a hash made by mxmrelay-passwd (never a clear password)",
                )
            space = spaces.get(_string(u, "customer", key, where))
            if space is None:
                raise bad(f"{key}.customer", "names no customer space in this file")
            if email.lower() in users:
                raise bad(f"{key}.email", f"duplicate user {email!r}")
            users[email.lower()] = User(email=email, password_hash=pw, customer=space)
        return cls(users=users, spaces=spaces)


def _table_list(data: Mapping[str, Any], name: str, where: str) -> list[dict[str, Any]]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidDirectory(f"{where}: {name}: must be an array of tables ([[{name}]])")
    return value


def _string(table: Mapping[str, Any], key: str, prefix: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidDirectory(f"{where}: {prefix}.{key}: missing or not a string")
    return value.strip()


def _flags(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FLAGS:
        raise InvalidDirectory(f"{where}: {key}: must be an integer from 0 to {MAX_FLAGS}")
    return value
