"""Password hashes: the formats a platform's web stack writes, checked alike.

Three formats are known, each through a well-kept library rather than code
of our own:

- ``scrypt$n=..,r=..,p=..$salt$hash``: what ``mxmrelay-passwd`` writes
  (``hashlib.scrypt``, in the standard library);
- bcrypt, ``$2a$``, ``$2b$`` and ``$2y$`` (what PHP's ``password_hash``
  writes; the same algorithm, which the ``bcrypt`` library knows as ``$2b$``);
- argon2id, the PHC string ``$argon2id$v=19$m=..,t=..,p=..$salt$hash``
  (``argon2-cffi``, the reference implementation's bindings).

Anything else is :class:`InvalidHash`: a start-up error for the directory
file, a temporary failure (454) for a platform answer.  A cost beyond the
bounds below is refused the same way: a hash is an instruction to spend
CPU and memory, and one from a broken platform must not stall the relay.

Checking is slow on purpose (tens to hundreds of milliseconds): callers run
:func:`verify` on a thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import threading

import argon2
import attrs
import bcrypt
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["DummyHash", "InvalidHash", "check", "dummy_like", "hash_password", "verify"]

# scrypt cost: 2**14 * 8 * 128 bytes = 16 MiB and ~40 ms per check.
_N, _R, _P, _DKLEN = 2**14, 8, 1, 32
#: The most memory one scrypt or argon2id check may take.
MAX_MEMORY = 256 * 1024 * 1024
#: bcrypt's cost (log2 rounds): 15 takes some seconds already.
BCRYPT_COSTS = range(4, 16)
#: argon2id's time cost and lanes.
MAX_ARGON2_TIME, MAX_ARGON2_LANES = 16, 16
#: bcrypt reads at most this many bytes of a password; PHP cut the rest off
#: when it made the hash, so the same cut makes the same check.
BCRYPT_MAX_PASSWORD = 72

_BCRYPT = re.compile(r"\$(2[aby])\$(\d\d)\$[./A-Za-z0-9]{53}")
FORMATS = "scrypt$..., bcrypt ($2a$, $2b$, $2y$) or argon2id ($argon2id$...)"


class InvalidHash(ValueError):
    """Not a password hash in a known format, or one with out-of-bounds cost."""


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """An encoded scrypt hash: ``scrypt$n=..,r=..,p=..$salt$hash``."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=_DKLEN)
    b64 = base64.b64encode
    return f"scrypt$n={n},r={r},p={p}${b64(salt).decode()}${b64(digest).decode()}"


PREFIXES = ("scrypt$", "$2a$", "$2b$", "$2y$", "$argon2id$")


def known_format(encoded: str) -> bool:
    """Does ``encoded`` start as a hash of a known format does?"""
    return encoded.startswith(PREFIXES)


def check(encoded: str) -> str:
    """The part of ``encoded`` that names its format and cost (its salt and
    digest cut off: ``$2b$12$``), or :class:`InvalidHash` saying why."""
    if encoded.startswith("scrypt$"):
        n, r, p, _, _ = _scrypt(encoded)
        return f"scrypt$n={n},r={r},p={p}"
    if encoded.startswith("$2"):
        match = _BCRYPT.fullmatch(encoded)
        if match is None:
            raise InvalidHash("not a valid bcrypt hash")
        if int(match[2]) not in BCRYPT_COSTS:
            raise InvalidHash(f"bcrypt cost must be from {BCRYPT_COSTS[0]} to "
                              f"{BCRYPT_COSTS[-1]}")
        return f"$2b${match[2]}$"
    if encoded.startswith("$argon2id$"):
        params = _argon2(encoded)
        return (f"$argon2id$v=19$m={params.memory_cost},t={params.time_cost},"
                f"p={params.parallelism}")
    raise InvalidHash(f"unknown password hash format (known: {FORMATS})")


def verify(password: str, encoded: str) -> bool:
    """Is ``password`` the one ``encoded`` was made from?  Constant time in
    the digest; :class:`InvalidHash` if ``encoded`` is no known hash."""
    check(encoded)
    secret = password.encode("utf-8", "surrogatepass")
    if encoded.startswith("scrypt$"):
        n, r, p, salt, expected = _scrypt(encoded)
        digest = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=len(expected),
                                maxmem=MAX_MEMORY + 1024 * 1024)
        return hmac.compare_digest(digest, expected)
    if encoded.startswith("$2"):
        # $2a$ and $2y$ are $2b$ (they differ only in bugs of old C code
        # that no maintained writer has); the library knows $2b$.
        return bcrypt.checkpw(secret[:BCRYPT_MAX_PASSWORD], ("$2b$" + encoded[4:]).encode())
    try:
        return bool(argon2.PasswordHasher().verify(encoded, secret))
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError) as e:
        raise InvalidHash(f"not a valid argon2id hash: {e}") from e


def _scrypt(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    try:
        _, params, salt64, hash64 = encoded.split("$")
        p = dict(kv.split("=") for kv in params.split(","))
        n, r, lanes = int(p["n"]), int(p["r"]), int(p["p"])
        salt = base64.b64decode(salt64, validate=True)
        expected = base64.b64decode(hash64, validate=True)
    except (ValueError, KeyError, binascii.Error):
        raise InvalidHash("not a valid scrypt hash (scrypt$n=..,r=..,p=..$salt$hash)") from None
    if set(p) != {"n", "r", "p"} or n < 2 or n & (n - 1) or r < 1 or lanes < 1 or \
            len(expected) < 16:
        raise InvalidHash("not a valid scrypt hash (n a power of 2, r and p positive)")
    if 128 * n * r > MAX_MEMORY or lanes > 16:
        raise InvalidHash(f"scrypt cost over {MAX_MEMORY // 2**20} MiB or p over 16")
    return n, r, lanes, salt, expected


def _argon2(encoded: str) -> argon2.Parameters:
    try:
        params = argon2.extract_parameters(encoded)
    except (InvalidHashError, ValueError) as e:
        raise InvalidHash(f"not a valid argon2id hash: {e or 'malformed'}") from None
    if params.version != 19:
        raise InvalidHash("argon2id version must be v=19")
    if params.memory_cost * 1024 > MAX_MEMORY or params.time_cost > MAX_ARGON2_TIME or \
            params.parallelism > MAX_ARGON2_LANES:
        raise InvalidHash(f"argon2id cost over m={MAX_MEMORY // 1024}, t={MAX_ARGON2_TIME}, "
                          f"p={MAX_ARGON2_LANES}")
    return params


# -- the dummy hash an unknown user is checked against ------------------------

# Any scrypt hash at the default cost serves as a template (its salt and
# digest are never used).
_DEFAULT_TEMPLATE = (f"scrypt$n={_N},r={_R},p={_P}$" + base64.b64encode(bytes(16)).decode() +
                     "$" + base64.b64encode(bytes(_DKLEN)).decode())

_DUMMIES: dict[str, str] = {}
_DUMMIES_LOCK = threading.Lock()
#: Formats and costs remembered at most (each a hash made once).
MAX_DUMMIES = 16


def dummy_like(encoded: str) -> str:
    """A hash of a random password in the format and at the cost of
    ``encoded``, made once per format and cost (so checking it costs what
    checking ``encoded`` costs)."""
    kind = check(encoded)
    with _DUMMIES_LOCK:
        found = _DUMMIES.get(kind)
    if found is not None:
        return found
    secret = os.urandom(16).hex()
    if kind.startswith("scrypt$"):
        n, r, p, _, _ = _scrypt(encoded)
        made = hash_password(secret, n=n, r=r, p=p)
    elif kind.startswith("$2b$"):
        made = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(int(kind[4:6]))).decode()
    else:
        params = _argon2(encoded)
        made = argon2.PasswordHasher.from_parameters(params).hash(secret)
    with _DUMMIES_LOCK:
        if len(_DUMMIES) >= MAX_DUMMIES:
            _DUMMIES.pop(next(iter(_DUMMIES)))
        return _DUMMIES.setdefault(kind, made)


@attrs.define
class DummyHash:
    """What an unknown user's password is checked against, so that a 535
    for an unknown address costs what a 535 for a known one does.

    A user population has one format and cost (the one the platform's web
    stack writes), so the dummy follows the known users: it takes the
    format and cost of the last known user's hash checked, and until one
    is, scrypt at ``mxmrelay-passwd``'s cost.
    """

    template: str = attrs.field(factory=lambda: _DEFAULT_TEMPLATE)

    def learn(self, encoded: str) -> None:
        """Follow a known user's hash (a valid one; called before checking it)."""
        self.template = encoded

    def encoded(self) -> str:
        return dummy_like(self.template)
