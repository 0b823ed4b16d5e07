"""Interleaved comparison with the floor: the per-repetition ratios, their
median and spread, and the check that every server shows the same key.

A machine shared with other work moves every absolute figure: in one run
the floor's repetitions were 550, 783 and 757 us per message.  What holds
is a ratio taken between measurements made close together, so the bench
runs the floor and the servers it compares with in the same repetition,
one after the other (floor, relay, ..., floor, relay, ...), takes one
ratio per repetition and judges the median of those ratios; the spread
(lowest to highest) says how far one repetition can be trusted.

Every server must do the same TLS work: :func:`check_keys` opens a
STARTTLS session to each and compares the certificate it presents with
the bench's (one ECDSA P-256 key for all).
"""

from __future__ import annotations

import smtplib
import ssl
import statistics
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec


def ratios(values: list[float], floor: list[float]) -> list[float]:
    """One ratio per repetition: ``values[i] / floor[i]`` (pairs where
    either is missing or zero are left out)."""
    out = []
    for v, f in zip(values, floor, strict=False):
        if v == v and f == f and f > 0:
            out.append(v / f)
    return out


def median_ratio(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float]) -> str:
    """``lowest-highest`` of the ratios, ``-`` for fewer than two."""
    if len(values) < 2:
        return "-"
    return f"{min(values):.2f}-{max(values):.2f}"


def verdict_detail(median: float, values: list[float]) -> str:
    """What a ratio verdict prints: the median, and the spread beside it."""
    if len(values) < 2:
        return f"{median:.2f}x, 1 repetition"
    return f"median {median:.2f}x, spread {spread(values)}"


def presented(port: int, host: str = "127.0.0.1") -> tuple[bytes, str]:
    """The certificate (DER) a server presents after ``STARTTLS``, and the
    TLS version and cipher negotiated with Python's default client."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(host, port, local_hostname="bench.example.com", timeout=30) as smtp:
        smtp.starttls(context=ctx)
        sock = smtp.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True) or b""
        cipher = sock.cipher()
        return der, f"{sock.version()} {cipher[0] if cipher else '?'}"


def check_keys(cert: Path, ports: dict[str, int]) -> str:
    """Each server (name: STARTTLS port) must present the bench's
    certificate, on an ECDSA key; raises otherwise.  Returns a note."""
    expected = ssl.PEM_cert_to_DER_cert(cert.read_text())
    key = x509.load_der_x509_certificate(expected).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise RuntimeError(f"{cert}: not an ECDSA key")
    seen = []
    for name, port in ports.items():
        der, session = presented(port)
        if der != expected:
            raise RuntimeError(f"{name} (port {port}) does not present the bench's certificate")
        seen.append(f"{name} {session}")
    return (f"every server presents the bench's certificate, ECDSA {key.curve.name} "
            f"(checked): " + "; ".join(seen))
