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
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("mxmrelay-passwd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("mxmrelay-passwd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
