"""The customer directory: customer spaces, their senders, and their users.

The SMTP code only ever talks to :class:`IDirectory`, so that a backend
other than the TOML file (the platform's own HTTP API, say) can be added
without touching the protocol.  Lookups return Deferreds for that reason,
even though the TOML backend answers at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

from mxmrelay import hashes, limits_keys
from mxmrelay.config import Problem, read_toml, unknown_keys
from mxmrelay.limits import NO_OVERRIDES, Network, Overrides

#: The bits an ``X-Mxm-Flags`` value may carry (1|2|4|8).
MAX_FLAGS = 15

#: The keys of a ``[[customer]]`` and of a ``[[user]]``; anything else is refused.
CUSTOMER_KEYS = ("id", "name", "domains", "flags", "from_flags", "allow_subdomains",
                 "explain", *limits_keys.SPACE_KEYS)
USER_KEYS = ("email", "password", "customer", "allowed_networks", "sandbox")


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
    #: Sending limits this space sets over the configuration's defaults.
    limits: Overrides = NO_OVERRIDES
    #: Whether the reply to DATA states what the rules decided (lines
    #: before the ``250 ... queued as <id>``; see mxmrelay/explain.py).
    explain: bool = True

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
    #: The networks this user may log in from (over the space's); None: the space's.
    allowed_networks: tuple[Network, ...] | None = None
    #: A sandbox credential: its sends are stored and shown, never delivered.
    sandbox: bool = False


class DirectoryError(Exception):
    """The directory could not answer (a temporary failure, not a 'no')."""


class InvalidDirectory(Exception):
    """The directory file is invalid; the message names file, key, reason
    (one line per problem, all of them, in ``problems``)."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


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
        try:
            data = read_toml(path, InvalidDirectory)
        except InvalidDirectory as e:
            reason = str(e).split(": ", 1)[1]
            raise InvalidDirectory(str(e), [Problem(str(path), "", reason)]) from e
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TomlDirectory:
        """The directory, or :class:`InvalidDirectory` with every problem
        (unknown keys included: a misspelled ``allow_subdomain`` would
        otherwise silently mean false)."""
        check = _Check(where, [])
        check.known(data, "", ("customer", "user"))
        spaces: dict[str, CustomerSpace] = {}
        for i, c in enumerate(check.tables(data, "customer")):
            space = check.space(c, f"customer[{i}]", spaces)
            if space is not None:
                spaces[space.id] = space
        users: dict[str, User] = {}
        for i, u in enumerate(check.tables(data, "user")):
            user = check.user(u, f"user[{i}]", spaces, users)
            if user is not None:
                users[user.email.lower()] = user
        if check.problems:
            raise InvalidDirectory("\n".join(map(str, check.problems)), check.problems)
        return cls(users=users, spaces=spaces)


@attrs.frozen
class _Check:
    """Reads the directory's tables, recording every problem."""

    where: str
    problems: list[Problem]

    def bad(self, key: str, reason: str) -> None:
        self.problems.append(Problem(self.where, key, reason))

    def known(self, table: Mapping[str, Any], prefix: str, keys: Sequence[str]) -> None:
        for key, reason in unknown_keys(table, keys):
            self.bad(f"{prefix}{key}", reason)

    def tables(self, data: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.bad(name, f"must be an array of tables ([[{name}]])")
            return []
        return value

    def string(self, table: Mapping[str, Any], key: str, prefix: str) -> str | None:
        value = table.get(key)
        if not isinstance(value, str) or not value.strip():
            self.bad(f"{prefix}.{key}", "missing or not a string")
            return None
        return value.strip()

    def flags(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FLAGS:
            self.bad(key, f"must be an integer from 0 to {MAX_FLAGS}")
            return 0
        return value

    def space(self, c: Mapping[str, Any], key: str,
              spaces: Mapping[str, CustomerSpace]) -> CustomerSpace | None:
        self.known(c, f"{key}.", CUSTOMER_KEYS)
        cid = self.string(c, "id", key)
        if cid is not None and cid in spaces:
            self.bad(f"{key}.id", f"duplicate customer space {cid!r}")
        domains = c.get("domains")
        if not isinstance(domains, list) or not domains or not all(
            isinstance(d, str) and d.strip() for d in domains
        ):
            self.bad(f"{key}.domains", "must be a non-empty list of domain names")
            domains = []
        flags = self.flags(c.get("flags", 0), f"{key}.flags")
        from_flags_raw = c.get("from_flags", {})
        if not isinstance(from_flags_raw, dict):
            self.bad(f"{key}.from_flags", "must be a table of address = flags")
            from_flags_raw = {}
        from_flags = {
            str(addr).lower(): self.flags(v, f"{key}.from_flags.{addr}")
            for addr, v in from_flags_raw.items()
        }
        allow_sub = c.get("allow_subdomains", False)
        if not isinstance(allow_sub, bool):
            self.bad(f"{key}.allow_subdomains", "must be true or false")
        overrides = limits_keys.overrides(c, lambda k, why: self.bad(f"{key}.{k}", why))
        explain = self.boolean(c, "explain", key, True)
        if cid is None or cid in spaces:
            return None
        return CustomerSpace(
            id=cid,
            name=str(c.get("name", cid)),
            domains=frozenset(normalise_domain(d) for d in domains),
            default_flags=flags,
            from_flags=from_flags,
            allow_subdomains=bool(allow_sub),
            limits=overrides,
            explain=explain,
        )

    def user(self, u: Mapping[str, Any], key: str, spaces: Mapping[str, CustomerSpace],
             users: Mapping[str, User]) -> User | None:
        self.known(u, f"{key}.", USER_KEYS)
        email = self.string(u, "email", key)
        if email is not None and "@" not in email:
            self.bad(f"{key}.email", "must be an email address")
        elif email is not None and email.lower() in users:
            self.bad(f"{key}.email", f"duplicate user {email!r}")
        pw = self.string(u, "password", key)
        if pw is not None:
            if not hashes.known_format(pw):
                self.bad(f"{key}.password", f"unknown password hash format (known: "
                         f"{hashes.FORMATS}): must be a hash (mxmrelay-passwd makes one), "
                         "never a clear password")
        name = self.string(u, "customer", key)
        space = spaces.get(name) if name is not None else None
        if name is not None and space is None:
            self.bad(f"{key}.customer", "names no customer space in this file")
        networks = limits_keys.networks(u, lambda k, why: self.bad(f"{key}.{k}", why))
        sandbox = self.boolean(u, "sandbox", key, False)
        if email is None or pw is None or space is None:
            return None
        return User(email=email, password_hash=pw, customer=space, allowed_networks=networks,
                    sandbox=sandbox)

    def boolean(self, table: Mapping[str, Any], name: str, prefix: str, default: bool) -> bool:
        value = table.get(name, default)
        if not isinstance(value, bool):
            self.bad(f"{prefix}.{name}", "must be true or false")
            return default
        return value


def space_from_dict(data: Mapping[str, Any], where: str) -> CustomerSpace:
    """A customer space read as a ``[[customer]]`` table is (the platform
    directory's answers carry the same keys), or :class:`InvalidDirectory`
    naming every problem."""
    check = _Check(where, [])
    space = check.space(data, "customer", {})
    if not isinstance(data.get("name", ""), str):
        check.bad("customer.name", "must be a string")
    if check.problems or space is None:
        raise InvalidDirectory("; ".join(map(str, check.problems)), check.problems)
    return space
