"""``mxmrelay-passwd``: print the hash of a password for the directory file.

The password is read from the terminal without echo, or from standard
input when that is not a terminal (for scripts), never from the command
line, where it would show in ``ps`` and in shell history.
"""

from __future__ import annotations

import getpass
import sys

from mxmrelay.auth import hash_password


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: mxmrelay-passwd  (reads the password from the terminal or stdin)",
              file=sys.stderr)
        return 2
    # At a prompt, the message starts on a line of its own.
    start = "\n" if sys.stdin is not None and sys.stdin.isatty() else ""
    try:
        password = _read()
    except EOFError:
        # Ctrl-D at the prompt, or a script's empty or closed stdin.
        print(f"{start}mxmrelay-passwd: no password given (end of input)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{start}mxmrelay-passwd: interrupted", file=sys.stderr)
        return 1
    if password is None:
        print("mxmrelay-passwd: the passwords differ", file=sys.stderr)
        return 1
    if not password:
        print("mxmrelay-passwd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def _read() -> str | None:
    """The password (None when the two typed differ); EOFError at the end
    of input, so that Ctrl-D and an empty pipe end the same way."""
    if sys.stdin is None:
        raise EOFError
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        return password if getpass.getpass("Again: ") == password else None
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


if __name__ == "__main__":
    raise SystemExit(main())
