"""The envelope's syntax: MAIL FROM and RCPT TO arguments (RFC 5321).

Pure functions, so that every odd address a client can send has a tested
answer.  Addresses that pass here never contain CR, LF, NUL or other
controls, so they are safe to put in a header later.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs

from mxmrelay.reply import Reply, quote

MAX_PATH = 256
MAX_LOCAL = 64
MAX_DOMAIN = 255

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_ATOM_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LABEL_UTF8 = re.compile(r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*"
                         r"(?:[A-Za-z0-9]|[^\x00-\x7f]))?")
_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]")
_SOURCE_ROUTE = re.compile(r"@[^:,]+(?:,@[^:,]+)*:")
_COMMAND = re.compile(r"(?is)(FROM|TO):\s*(<[^<>]*>|[^\s<>]+)(.*)")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


@attrs.frozen
class Path:
    address: str  # "" for the null reverse-path <>
    params: dict[str, str | None]


def parse_path_command(arg: str, *, which: str, esmtp: bool) -> Path:
    """Parse ``FROM:<addr> params`` (``which`` is "FROM") or ``TO:...``."""
    bad = bad_sender if which == "FROM" else bad_recipient
    m = _COMMAND.fullmatch(arg.strip())
    if m is None or m.group(1).upper() != which:
        command = "MAIL FROM" if which == "FROM" else "RCPT TO"
        raise Reply(501, "5.5.4", f"Syntax: {command}:<address>")
    path = m.group(2)
    if path.startswith("<"):
        path = path[1:-1]
    params = parse_params(m.group(3))
    if params and not esmtp:
        raise Reply(555, "5.5.4", "Unsupported option: parameters need EHLO")
    path = _SOURCE_ROUTE.sub("", path, count=1) if path.startswith("@") else path
    if path == "":
        return Path("", params)
    return Path(check_address(path, bad), params)


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP ``KEYWORD[=value]`` parameters, keywords upper-cased."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not value) or not value.isprintable():
            raise Reply(501, "5.5.4", "Syntax error in parameters")
        params[key.upper()] = value if eq else None
    return params


def check_address(address: str, bad: Callable[[], Reply]) -> str:
    """Return ``address`` if it is a valid RFC 5321/6531 mailbox; else
    raise what ``bad()`` makes."""
    if any(c < " " or c == "\x7f" for c in address):
        raise bad()
    if len(address.encode("utf-8", "surrogatepass")) > MAX_PATH - 2:
        raise bad()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise bad()
    utf8 = not address.isascii()
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL:
        raise bad()
    if len(domain.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        raise bad()
    dot_atom, quoted = (_DOT_ATOM_UTF8, _QUOTED_UTF8) if utf8 else (_DOT_ATOM, _QUOTED)
    if not (dot_atom.fullmatch(local) or quoted.fullmatch(local)):
        raise bad()
    if not _LITERAL.fullmatch(domain):
        label = _LABEL_UTF8 if utf8 else _LABEL
        labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
        if not all(label.fullmatch(x) for x in labels):
            raise bad()
    return address


# Factories, not constants: an exception instance raised a second time
# chains the new frames onto its ``__traceback__``, so a module-level one
# would keep every connection that ever got that reply alive for good.

def bad_sender() -> Reply:
    return Reply(501, "5.1.7", "Bad sender address syntax")


def bad_recipient() -> Reply:
    return Reply(501, "5.1.3", "Bad recipient address syntax")


def need_smtputf8() -> Reply:
    return Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")


def mail_parameters(params: dict[str, str | None], max_size: int) -> bool:
    """Check MAIL FROM's ESMTP parameters; return whether SMTPUTF8 was
    declared.  Raises the :class:`Reply` of the first one refused."""
    smtputf8 = False
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or not value.isascii():
                raise Reply(501, "5.5.4", "Bad message size syntax")
            if int(value) > max_size:
                raise Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        elif key == "BODY":
            # A known parameter with a value it does not allow is a
            # syntax error (501), not an unknown option (555).
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise Reply(501, "5.5.4", "Bad BODY parameter")
        elif key == "SMTPUTF8":
            if value is not None:
                raise Reply(501, "5.5.4", "Bad SMTPUTF8 parameter")
            smtputf8 = True
        elif key != "AUTH":  # RFC 4954 5: AUTH=<> may be sent; ignored
            raise Reply(555, "5.5.4", f"Unsupported option: {quote(key)}")
    return smtputf8
