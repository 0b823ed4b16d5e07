"""The rules over a corpus: messages as real client libraries write them
(tests/corpus), each with its expected send."""

from __future__ import annotations

from mxmrelay.headers import split_message
from tests.rules_support import CORPUS, RECEIVED, TOUCHED, Case, fields, name_of

# ----------------------------------------------------------------------------
# The corpus: messages as real client libraries write them

#: file -> (MAIL FROM, RCPT TO, expected From, expected To (None: unchanged),
#:          to, bcc, flags, tags, message_id)
CORPUS_EXPECTED: dict[
    str,
    tuple[str, tuple[str, ...], bytes, bytes | None, str, str | None, int, tuple[str, ...], str],
] = {
    "multipart_alternative.eml": (
        "noreply@oxford-stones.example",
        ("jane.smith@example.org", "archive@oxford-stones.example"),
        b"From: Oxford Stones <noreply@oxford-stones.example>",
        None,
        "jane.smith@example.org",
        "archive@oxford-stones.example",
        3,
        ("order", "shipping", "guest"),
        "<65940a62b1c2_3f1a2c@web-01.mail>",
    ),
    "utf8_8bit.eml": (
        "versand@bücher.example",
        ("zoë@xn--bcher-kva.example",),
        "From: Jörg Müller <versand@bücher.example>".encode(),
        None,
        "zoë@bücher.example",
        None,
        4,
        ("Bestellbestätigung", "Köln"),
        "<20240103080000.1234@bücher.example>",
    ),
    "long_folded.eml": (
        "bookings@oxford-stones.example",
        ("jane@example.org", "john@example.org", "accounts@example.org"),
        b'From: "Oxford Stones Limited, Reservations and Enquiries Department"\r\n'
        b" <bookings@oxford-stones.example>",
        b'To: "Jane Smith" <jane@example.org>',
        "jane@example.org",
        "john@example.org",
        1,
        (),
        "<CAF=abc123.def456@mail.oxford-stones.example>",
    ),
    "pdf_attachment.eml": (
        "invoices@oxford-stones.example",
        ("Accounts@Customer.example",),
        b"From: invoices@oxford-stones.example (Acme Tools Billing)",
        None,
        "accounts@customer.example",
        None,
        4,
        ("invoice",),
        "<inv-2024-0042.1704387600@billing.acme-tools.example>",
    ),
    "phpmailer.eml": (
        "bookings@oxford-stones.example",
        ("jane.smith@example.org", "manager@oxford-stones.example"),
        b"From: Oxford Stones <bookings@oxford-stones.example>",
        None,
        "jane.smith@example.org",
        "manager@oxford-stones.example",
        7,
        ("booking", "confirmation"),
        "<Zyx5Qb6TfRa0CnJ8Zv4kqbRt2nIkNJvY3nfbH8bWc@www.oxford-stones.example>",
    ),
    "dotnet_smtpclient.eml": (
        "orders@oxford-stones.example",
        ("jane@example.org", "john@example.org"),
        b'From: "Oxford Stones" <orders@oxford-stones.example>',
        b"To: jane@example.org",
        "jane@example.org",
        "john@example.org",
        4,
        ("order", "confirmation", "café"),
        "",
    ),
    "python_email.eml": (
        "security@oxford-stones.example",
        ("jane@example.org",),
        b"From: Oxford Stones Security <security@oxford-stones.example>",
        None,
        "jane@example.org",
        None,
        1,
        ("security", "café"),
        "<170419053012.4242.1234567890@app-01.oxford-stones.example>",
    ),
}


class CorpusTests(Case):
    def load(self, name: str) -> bytes:
        data = (CORPUS / name).read_bytes()
        if b"\r\n" not in data:  # checked out with LF line endings after all
            data = data.replace(b"\n", b"\r\n")
        return data

    def test_every_file_has_an_expectation(self) -> None:
        self.assertEqual(sorted(p.name for p in CORPUS.glob("*.eml")), sorted(CORPUS_EXPECTED))

    def test_corpus(self) -> None:
        for name, expectation in CORPUS_EXPECTED.items():
            mail_from, rcpt, from_, to_field, to, bcc, flags, tags, mid = expectation
            message = self.load(name)
            i = split_message(message)
            assert i is not None, name
            header_section, rest = message[:i], message[i:]
            send = self.send(header_section, mail_from=mail_from, rcpt=rcpt)

            expected = [RECEIVED]
            first_to = True
            for field in fields(header_section):
                kind = name_of(field)
                if kind in TOUCHED - {b"from", b"to"}:
                    continue
                if kind == b"from":
                    field = from_ + b"\r\n"
                elif kind == b"to":
                    if not first_to:
                        continue
                    first_to = False
                    if to_field is not None:
                        field = to_field + b"\r\n"
                expected.append(field)
            self.assertEqual(send.headers + rest, b"".join(expected) + rest, name)
            self.assertEqual(
                (send.to, send.bcc, send.flags, send.tags, send.message_id or ""),
                (to, bcc, flags, tags, mid),
                name,
            )
            self.assertEqual(send.bcc_flags, None if bcc is None else flags & ~3, name)
            self.assertEqual(send.return_path, "bounce+S1@bounces.example.net")
