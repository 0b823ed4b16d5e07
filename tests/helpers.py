"""Small helpers every kind of test uses: where the project is, the
``250`` reply's id, polling against a deadline, loopback ports, child
processes, TOML files and temporary folders.

What runs a relay for a test is in :mod:`tests.support`; what runs
``twistd`` as a real process in :mod:`tests.process_support`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"

#: The relay's reply to the end of DATA, up to the id.
QUEUED = "250 2.0.0 Ok: queued as "


def queued(send_id: str = r"\S+") -> re.Pattern[str]:
    """The ``250`` reply, its id (matching ``send_id``) as group 1."""
    return re.compile(re.escape(QUEUED) + f"({send_id})")


def queued_id(text: str, send_id: str = r"\S+", *, alone: bool = False) -> str:
    """The id of the last ``250 2.0.0 Ok: queued as <id>`` in ``text`` (a
    client's output); ``alone``: ``text`` must be that reply, whole (its
    last line; any before it ``250-`` lines that explain the decision)."""
    if alone:
        *before, reply = text.split("\n")
        if before and not reply.startswith("250 "):  # smtplib joins the lines' texts
            reply = "250 " + reply
        assert reply.startswith(QUEUED), text
        return reply[len(QUEUED):]
    found = queued(send_id).findall(text) or re.findall(
        rf"(?m)^2\.0\.0 Ok: queued as ({send_id})", text)
    assert found, f"no '{QUEUED}<id>' in:\n{text}"
    last: str = found[-1]
    return last


def need(program: str) -> str:
    """The path of ``program``, or skip the test: the client it stands for
    is optional (``make tools`` installs it where it can)."""
    path = shutil.which(program)
    if path is None:
        raise unittest.SkipTest(f"{program} is not installed (make tools installs it)")
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: the project first on its path
    (so a child Python runs these sources, not what was last installed),
    and no socket activation variables of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


async def run_apart(executable: str | Path, *args: str | Path, stdin: bytes | None = None,
                    path: Path | None = None) -> tuple[str, str, int]:
    """A short-lived process, under the reactor (which the relay under
    test shares): its stdout, its stderr, and its exit code."""
    out, err, code = await getProcessOutputAndValue(
        str(executable), [str(a) for a in args], env=child_env(),
        path=None if path is None else str(path), reactor=reactor, stdinBytes=stdin)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


async def run(executable: str | Path, *args: str | Path, stdin: bytes | None = None,
              path: Path | None = None) -> tuple[str, int]:
    """A short-lived process: its stdout and stderr together, and its exit code."""
    out, err, code = await run_apart(executable, *args, stdin=stdin, path=path)
    return out + err, code


async def until(check: Callable[[], bool | Awaitable[bool]], what: str,
                timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``check`` (which may wait) until it is true, or fail after
    ``timeout``: for what nothing signals."""
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


class ProcessOutput(ProcessProtocol):
    """A child process's stdout and stderr as one text, its end as a
    Deferred, and how it ended (``status``: the ProcessDone/ProcessTerminated)."""

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[None] = Deferred()
        self.status: Any = None

    def outReceived(self, data: bytes) -> None:
        self.data += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.status = reason.value
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def free_ports(n: int) -> list[int]:
    """n loopback ports free right now (all bound at once, so distinct)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_number(listening: IListeningPort) -> int:
    address = listening.getHost()
    assert isinstance(address, IPv4Address), address
    return address.port


def listen(factory: IProtocolFactory, port: int = 0) -> tuple[IListeningPort, int]:
    """``factory`` listening on loopback ``port`` (0: a free one): the
    listening port, and its number."""
    # listenTCP takes any IProtocolFactory; its annotation says
    # ServerFactory, generic in a protocol type few factories state.
    listening = reactor.listenTCP(port, cast("ServerFactory[Any]", factory),
                                  interface="127.0.0.1")
    return listening, port_number(listening)


async def closed_port() -> int:
    """A loopback port nobody listens on (a server that is down)."""
    listening, number = listen(Factory.forProtocol(Protocol))
    stopped = listening.stopListening()
    if stopped is not None:
        await stopped
    return number


def folder_for(testcase: unittest.TestCase | unittest.SynchronousTestCase) -> Path:
    """A new empty folder of the test's own."""
    folder = Path(testcase.mktemp()).resolve()
    folder.mkdir(parents=True)
    return folder


def toml(data: dict[str, Any]) -> str:
    """Just enough TOML: scalars, tables, arrays of tables of scalars."""
    def pairs(d: dict[str, Any]) -> list[str]:
        return [f"{k} = {json.dumps(v)}" for k, v in d.items()]

    lines = pairs({k: v for k, v in data.items() if not isinstance(v, dict | list)})
    for key, value in data.items():
        if isinstance(value, dict):
            lines += [f"[{key}]", *pairs(value)]
        elif isinstance(value, list):
            for item in value:
                lines += [f"[[{key}]]", *pairs(item)]
    return "\n".join(lines) + "\n"


def write(folder: Path, name: str, data: dict[str, Any] | str) -> Path:
    """``folder/name``, holding ``data`` (TOML unless already text)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else toml(data))
    return path
