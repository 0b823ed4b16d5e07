"""The SMTP clients customers really use, end to end against the relay.

Each client sends one message, over STARTTLS on the submission port and
over implicit TLS on the smtps port, verifying the relay's certificate:
From a display name and app@example.com, To someone@example.org, a
Subject and a body that are not ASCII, and ``X-Mxm-Tag: compat,<client>``.
The send is then looked up in the reference delivery API by its tag, and
its recipient, tags, listener, TLS and final message are checked; where
the client tells the ``250`` reply's id, it must be the stored send's id.

- Nodemailer (npm, installed by ``make tools`` into ``var/node``)
- PHPMailer (Debian's ``libphp-phpmailer`` and ``php-cli``)
- msmtp (Debian's ``msmtp``), as sendmail replacements are used from cron
  and shell scripts
- Python's ``email`` + ``smtplib.send_message``, as Django and Flask apps
  send: a multipart/alternative with an attachment, whose body must be
  stored byte for byte

A client that is not installed is skipped, saying so; nothing else is.
Processes run under the reactor (``getProcessOutputAndValue``), never
blocking, since the relay under test shares it; smtplib runs on a thread.
"""

from __future__ import annotations

import json
import re
import smtplib
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser, Parser
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.trial import unittest

from tests.helpers import ROOT, need, queued, queued_id, run_apart
from tests.support import RelayUnderTest, fetch_bytes, fetch_json, in_thread

NODEMAILER = ROOT / "var" / "node" / "node_modules" / "nodemailer"
PHPMAILER = Path("/usr/share/php/libphp-phpmailer/autoload.php")
USER, PASSWORD = "demo@example.com", "demo-password"
SENDER = "app@example.com"
RECIPIENT = "someone@example.org"
#: Short enough for one encoded word: CPython's header folding drops the
#: space between two encoded words it splits a longer one into.
SUBJECT = "Bestellung 4711 \N{EN DASH} Grüße aus Zürich ✓"
TEXT = "Grüß Gott,\n\nIhre Bestellung ist unterwegs. Café, crème brûlée, 東京.\n"
#: The id in the DATA reply: Crockford's base 32 in lower case, as the relay writes it.
SEND_ID = r"[0-9a-hjkmnp-tv-z]{26}\b"
QUEUED = queued(SEND_ID)
#: The role of each run, and whether its TLS is implicit.
ROLES = {"submission": False, "smtps": True}


def display_name(client: str) -> str:
    return f"Café {client}"


class CompatTestCase(unittest.TestCase):
    """One relay per test; the checks every client's send must pass."""

    timeout = 30
    client = ""
    #: The text part as sent.
    text = TEXT

    def setUp(self) -> None:
        self.relay = RelayUnderTest(self)
        assert self.relay.api is not None
        self.api_url = self.relay.api.url
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)

    async def stored(self, listener: str, reply_id: str | None = None) -> tuple[
            dict[str, Any], bytes, EmailMessage]:
        """The one send tagged with this client, checked; its final message
        as stored, and parsed."""
        found = await fetch_json(f"{self.api_url}?tag={quote(self.client)}")
        sends = found["sends"]
        self.assertEqual(len(sends), 1, found)
        send = sends[0]
        if reply_id is not None:
            self.assertEqual(send["id"], reply_id)
        one = await fetch_json(f"{self.api_url}/{send['id']}")
        self.assertEqual(one["id"], send["id"])
        self.assertEqual(one["to"], RECIPIENT)
        self.assertEqual(one["mail_from"], SENDER)
        self.assertEqual(one["tags"], ["compat", self.client])
        self.assertEqual(one["customer"], "demo")
        self.assertEqual(one["client"]["listener"], listener)
        self.assertIn(one["client"]["tls_version"], ("TLSv1.2", "TLSv1.3"))
        raw = await fetch_bytes(f"{self.api_url}/{send['id']}/message")
        # The headers from the text: msmtp's are raw UTF-8, which a
        # BytesParser would turn into surrogates; the body from the bytes.
        head = Parser(policy=policy.default).parsestr(raw.decode("utf-8"), headersonly=True)
        self.assertEqual(str(head["From"]), f"{display_name(self.client)} <{SENDER}>")
        self.assertEqual([(a.display_name, a.addr_spec) for a in head["From"].addresses],
                         [(display_name(self.client), SENDER)])
        self.assertEqual([a.addr_spec for a in head["To"].addresses], [RECIPIENT])
        self.assertEqual(str(head["Subject"]), SUBJECT)
        self.assertIsNone(head["X-Mxm-Tag"])  # a control header: removed
        self.assertIsNone(head["Return-Path"])
        self.assertTrue(raw.startswith(b"Received: "), raw[:200])
        self.assertNotIn(b"\n", raw.replace(b"\r\n", b""))  # CRLF throughout
        msg = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(msg, EmailMessage)
        text = msg.get_body(("plain",))
        assert text is not None
        self.assertEqual(text.get_content().replace("\r\n", "\n"), self.text)
        return one, raw, msg


# -- Nodemailer --------------------------------------------------------------

NODEMAILER_JS = r"""
const fs = require('fs');
const [modulePath, configJSON] = process.argv.slice(2);
const nodemailer = require(modulePath);
const c = JSON.parse(configJSON);
const transport = nodemailer.createTransport({
  host: '127.0.0.1', port: c.port, secure: c.secure, requireTLS: !c.secure,
  name: 'client.test',
  auth: {user: c.user, pass: c.pass},
  tls: {ca: fs.readFileSync(c.ca), servername: 'localhost'},
  connectionTimeout: 10000, greetingTimeout: 10000, socketTimeout: 20000,
  logger: true, debug: true,
});
transport.sendMail({
  from: {name: c.name, address: c.from},
  to: c.to,
  subject: c.subject,
  text: c.text,
  html: '<p>' + c.text + '</p>',
  headers: {'X-Mxm-Tag': c.tag},
}).then((info) => {
  console.log('RESULT ' + JSON.stringify({response: info.response, accepted: info.accepted,
                                          rejected: info.rejected}));
  transport.close();
}).catch((err) => {
  console.error('FAILED ' + (err && err.stack || err));
  transport.close();
  process.exitCode = 1;
});
"""


class Nodemailer(CompatTestCase):
    client = "nodemailer"

    def setUp(self) -> None:
        self.node = need("node")
        if not (NODEMAILER / "package.json").exists():
            raise unittest.SkipTest(f"{NODEMAILER} is missing (make tools installs it with npm)")
        super().setUp()

    async def send(self, role: str) -> None:
        script = self.folder / "send.js"
        script.write_text(NODEMAILER_JS)
        config = {"port": self.relay.ports[role], "secure": ROLES[role],
                  "ca": str(self.relay.ca_file), "user": USER, "pass": PASSWORD,
                  "name": display_name(self.client), "from": SENDER, "to": RECIPIENT,
                  "subject": SUBJECT, "text": TEXT, "tag": f"compat,{self.client}"}
        out, err, code = await run_apart(self.node, script, NODEMAILER, json.dumps(config),
                                   path=self.folder)
        self.assertEqual(code, 0, out + err)
        result = json.loads(next(line for line in out.splitlines()
                                 if line.startswith("RESULT "))[len("RESULT "):])
        self.assertEqual(result["accepted"], [RECIPIENT])
        self.assertEqual(result["rejected"], [])
        # info.response is the DATA reply: its last token is the send's id.
        self.assertRegex(result["response"], QUEUED)
        await self.stored(role, queued_id(result["response"], SEND_ID))

    async def test_starttls(self) -> None:
        """secure: false, requireTLS: true on the submission port."""
        await self.send("submission")

    async def test_smtps(self) -> None:
        """secure: true on the smtps port."""
        await self.send("smtps")


# -- PHPMailer ---------------------------------------------------------------

PHPMAILER_PHP = r"""<?php
require $argv[1];
use PHPMailer\PHPMailer\PHPMailer;
use PHPMailer\PHPMailer\SMTP;

$c = json_decode($argv[2], true);
$mail = new PHPMailer(true);
$mail->isSMTP();
$mail->Host = '127.0.0.1';
$mail->Port = $c['port'];
$mail->SMTPSecure = $c['smtps'] ? PHPMailer::ENCRYPTION_SMTPS : PHPMailer::ENCRYPTION_STARTTLS;
$mail->SMTPAutoTLS = false;
$mail->SMTPAuth = true;
$mail->Username = $c['user'];
$mail->Password = $c['pass'];
$mail->SMTPOptions = ['ssl' => [
    'cafile' => $c['ca'], 'verify_peer' => true, 'verify_peer_name' => true,
    'peer_name' => 'localhost', 'allow_self_signed' => false,
]];
$mail->Timeout = 10;
$mail->Hostname = 'client.test';
$mail->CharSet = PHPMailer::CHARSET_UTF8;
$mail->SMTPDebug = SMTP::DEBUG_SERVER;
$mail->Debugoutput = function ($line, $level) { fwrite(STDERR, rtrim($line) . "\n"); };
$mail->action_function = function ($isSent, $to, $cc, $bcc, $subject, $body, $from,
                                   $extra) {
    echo 'RESULT ' . json_encode(['sent' => $isSent, 'id' => $extra['smtp_transaction_id']]),
         "\n";
};
$mail->setFrom($c['from'], $c['name']);
$mail->addAddress($c['to']);
$mail->Subject = $c['subject'];
$mail->isHTML(true);
$mail->Body = '<p>' . htmlspecialchars($c['text']) . '</p>';
$mail->AltBody = $c['text'];
$mail->addCustomHeader('X-Mxm-Tag', $c['tag']);
try {
    $ok = $mail->send();
    echo 'SENT ' . json_encode($ok), "\n";
} catch (Exception $e) {
    echo 'FAILED ', $mail->ErrorInfo, "\n";
    exit(1);
}
"""


class PHPMailer(CompatTestCase):
    client = "phpmailer"

    def setUp(self) -> None:
        self.php = need("php")
        if not PHPMAILER.exists():
            raise unittest.SkipTest(f"{PHPMAILER} is missing (make tools installs "
                                    "Debian's libphp-phpmailer)")
        super().setUp()

    async def send(self, role: str) -> None:
        script = self.folder / "send.php"
        script.write_text(PHPMAILER_PHP)
        config = {"port": self.relay.ports[role], "smtps": ROLES[role],
                  "ca": str(self.relay.ca_file), "user": USER, "pass": PASSWORD,
                  "name": display_name(self.client), "from": SENDER, "to": RECIPIENT,
                  "subject": SUBJECT, "text": TEXT, "tag": f"compat,{self.client}"}
        out, err, code = await run_apart(self.php, script, PHPMAILER, json.dumps(config),
                                   path=self.folder)
        self.assertEqual(code, 0, out + err)
        self.assertIn("SENT true", out, out + err)
        result = json.loads(next(line for line in out.splitlines()
                                 if line.startswith("RESULT "))[len("RESULT "):])
        self.assertTrue(result["sent"], out + err)
        # PHPMailer reads the id from the 250 reply (its "postfix" pattern).
        self.assertRegex(err, QUEUED)
        self.assertEqual(result["id"], queued_id(err, SEND_ID))
        await self.stored(role, result["id"])

    async def test_starttls(self) -> None:
        """ENCRYPTION_STARTTLS on the submission port."""
        await self.send("submission")

    async def test_smtps(self) -> None:
        """ENCRYPTION_SMTPS on the smtps port."""
        await self.send("smtps")


# -- msmtp -------------------------------------------------------------------


class Msmtp(CompatTestCase):
    client = "msmtp"

    def setUp(self) -> None:
        self.msmtp = need("msmtp")
        super().setUp()

    def message(self) -> bytes:
        """What a script pipes into msmtp: raw UTF-8 in the Subject (no
        encoded word), an 8-bit body, and LF line endings."""
        return (f'From: "{display_name(self.client)}" <{SENDER}>\n'
                f"To: {RECIPIENT}\n"
                f"Subject: {SUBJECT}\n"
                f"Date: {formatdate(localtime=True)}\n"
                f"Message-ID: {make_msgid(domain='client.test')}\n"
                f"X-Mxm-Tag: compat,{self.client}\n"
                "MIME-Version: 1.0\n"
                "Content-Type: text/plain; charset=utf-8\n"
                "Content-Transfer-Encoding: 8bit\n"
                f"\n{TEXT}").encode()

    async def send(self, role: str) -> None:
        log = self.folder / "msmtp.log"
        out, err, code = await run_apart(
            self.msmtp, "--host=127.0.0.1", f"--port={self.relay.ports[role]}",
            "--tls=on", f"--tls-starttls={'off' if ROLES[role] else 'on'}",
            f"--tls-trust-file={self.relay.ca_file}", "--domain=client.test",
            "--auth=on", f"--user={USER}", f"--passwordeval=echo {PASSWORD}",
            f"--from={SENDER}", f"--logfile={log}", "--timeout=10", RECIPIENT,
            stdin=self.message(), path=self.folder)
        logged = log.read_text() if log.exists() else ""
        self.assertEqual(code, 0, out + err + logged)
        self.assertIn("exitcode=EX_OK", logged)
        self.assertIn("smtpstatus=250", logged)
        _, raw, _ = await self.stored(role, queued_id(logged, SEND_ID))
        # The display name, quoted as the script wrote it, byte for byte.
        self.assertIn(f'\r\nFrom: "{display_name(self.client)}" <{SENDER}>\r\n'.encode(), raw)

    async def test_starttls(self) -> None:
        """--tls-starttls=on on the submission port."""
        await self.send("submission")

    async def test_smtps(self) -> None:
        """--tls-starttls=off (implicit TLS) on the smtps port."""
        await self.send("smtps")


# -- Python's email and smtplib ----------------------------------------------

HTML = "<p>Grüß Gott,</p>\n<p>Ihre Bestellung ist unterwegs.</p>\n"
#: A receipt that is not text, with every byte value, and a line that
#: starts with a dot in the text part (dot-stuffing).
ATTACHMENT = bytes(range(256)) * 40
DOTTED = "\n.\n..two dots\n.one dot\n"


class Smtplib(CompatTestCase):
    """``EmailMessage`` and ``SMTP.send_message``, as Django and Flask send."""

    client = "smtplib"
    text = TEXT + DOTTED

    def message(self) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = Address(display_name(self.client), "app", "example.com")
        msg["To"] = RECIPIENT
        msg["Subject"] = SUBJECT
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain="client.test")
        msg["X-Mxm-Tag"] = f"compat,{self.client}"
        msg.set_content(self.text)
        msg.add_alternative(HTML, subtype="html")
        msg.add_attachment(ATTACHMENT, maintype="application", subtype="pdf",
                           filename="Rechnung-4711-Übersicht.pdf")
        return msg

    def send_blocking(self, role: str, msg: EmailMessage) -> tuple[int, bytes]:
        """On a thread: send_message over implicit TLS or STARTTLS; the DATA
        reply (smtplib keeps it to itself, so it is caught on the way)."""
        context = self.relay.client_context()
        port = self.relay.ports[role]
        client: smtplib.SMTP
        if ROLES[role]:
            client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context,
                                      local_hostname="client.test")
        else:
            client = smtplib.SMTP("127.0.0.1", port, timeout=10, local_hostname="client.test")
        replies: list[tuple[int, bytes]] = []
        data = client.data

        def recording_data(payload: Any) -> tuple[int, bytes]:
            reply = data(payload)
            replies.append(reply)
            return reply

        client.data = recording_data  # type: ignore[assignment]
        try:
            if not ROLES[role]:
                client.starttls(context=context)
            client.login(USER, PASSWORD)
            refused = client.send_message(msg)
            assert refused == {}, refused
        finally:
            client.quit()
        assert len(replies) == 1, replies
        return replies[0]

    async def send(self, role: str) -> None:
        msg = self.message()
        # What send_message puts on the wire: the message flattened with CRLF
        # (and the multipart boundaries fixed by this first flattening).
        wire = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
        sent = BytesParser(policy=policy.default).parsebytes(wire)
        self.assertEqual(str(sent["Subject"]), SUBJECT)  # the client's own encoding
        code, reply = await in_thread(self.send_blocking, role, msg)
        self.assertEqual(code, 250, reply)
        self.assertEqual(wire, msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
        one, raw, stored = await self.stored(role, queued_id(f"{code} {reply.decode()}", SEND_ID))

        head, _, body = wire.partition(b"\r\n\r\n")
        stored_head, _, stored_body = raw.partition(b"\r\n\r\n")
        self.assertEqual(stored_body, body)  # byte for byte
        # Every header but the control header passes byte for byte, in order,
        # under the relay's Received.
        sent_headers = [h for h in re.split(rb"\r\n(?![ \t])", head)
                        if not h.lower().startswith(b"x-mxm-tag:")]
        kept = re.split(rb"\r\n(?![ \t])", stored_head)
        self.assertTrue(kept[0].startswith(b"Received: "), kept[0])
        self.assertEqual(kept[1:], sent_headers)

        self.assertEqual(one["message_id"], msg["Message-ID"])
        self.assertEqual(stored.get_content_type(), "multipart/mixed")
        html = stored.get_body(("html",))
        assert html is not None
        self.assertEqual(html.get_content().replace("\r\n", "\n"), HTML)
        attachments = list(stored.iter_attachments())
        self.assertEqual([a.get_filename() for a in attachments],
                         ["Rechnung-4711-Übersicht.pdf"])
        self.assertEqual(attachments[0].get_content(), ATTACHMENT)

    async def test_starttls(self) -> None:
        """SMTP(...).starttls() on the submission port."""
        await self.send("submission")

    async def test_smtps(self) -> None:
        """SMTP_SSL on the smtps port."""
        await self.send("smtps")
