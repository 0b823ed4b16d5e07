"""What an operator watches: the relay's Prometheus metrics.

Every metric is defined here, once, with the names and labels of
Prometheus' naming guide (``mxmrelay_`` prefix, ``_total`` counters, base
units), and recorded through the small functions below, so that a call
site is one line and cannot invent a label.  Label values are bounded:
listener roles, TLS versions, result words chosen here, three-digit reply
codes the relay itself writes, and customer space ids (bounded by the
directory: a space exists only once the operator or the platform has made
it).  No client address, user name or free text is ever a label.

With ``workers = N`` every process writes its values to files in one
shared folder (prometheus-client's multiprocess mode, see
:mod:`mxmrelay.metrics_http`), and whichever process answers a scrape sums
them; gauges say how (``livesum``: the live processes' values added up;
``max``: the newest time).  That choice is made per process before any
value exists (:func:`use_multiprocess`), so the definitions below are the
same in both modes.
"""

from __future__ import annotations

import os
import time

from prometheus_client import Counter, Gauge, Histogram

#: The words ``result`` labels may take, per metric (anything else is a bug).
AUTH_RESULTS = ("success", "failure", "blocked", "error")
SEND_RESULTS = ("forwarded", "refused", "deferred")

CONNECTIONS = Counter(
    "mxmrelay_connections", "SMTP connections accepted, by listener role.", ["listener"])
CONNECTIONS_OPEN = Gauge(
    "mxmrelay_connections_open", "SMTP connections open now, by listener role.",
    ["listener"], multiprocess_mode="livesum")
TLS_HANDSHAKES = Counter(
    "mxmrelay_tls_handshakes", "TLS sessions established (STARTTLS or implicit TLS), "
    "by listener role and TLS version.", ["listener", "tls_version"])
TLS_HANDSHAKE_FAILURES = Counter(
    "mxmrelay_tls_handshake_failures", "TLS handshakes that failed or were abandoned, and "
    "plain text on the implicit-TLS port, by listener role.", ["listener"])
AUTH_ATTEMPTS = Counter(
    "mxmrelay_auth_attempts", "AUTH attempts by result: success, failure (wrong "
    "credentials), blocked (rate limit, 454), error (directory unavailable, 454).",
    ["result"])
AUTH_BLOCKS = Counter(
    "mxmrelay_auth_blocks", "AUTH refused by a failure limit without checking the "
    "password, by the limit's scope (address or user).", ["scope"])
TRANSACTIONS = Counter(
    "mxmrelay_transactions", "Mail transactions ended at the end of DATA, by outcome "
    "(accepted, deferred, rejected) and the SMTP reply code given.", ["outcome", "code"])
SENDS = Counter(
    "mxmrelay_sends", "Sends by customer space id and result: forwarded (the API holds "
    "it), refused (5xx: a rule or the API said no), deferred (4xx: try again).",
    ["customer", "result"])
SENDS_IN_FLIGHT = Gauge(
    "mxmrelay_sends_in_flight", "Sends posted to the delivery API and not yet answered.",
    multiprocess_mode="livesum")
MESSAGE_SIZE = Histogram(
    "mxmrelay_message_size_bytes", "Size of each message received (after dot-unstuffing).",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864))
API_DURATION = Histogram(
    "mxmrelay_delivery_api_request_duration_seconds", "Time for one POST to the delivery "
    "API, to its answer or failure.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
API_REQUESTS = Counter(
    "mxmrelay_delivery_api_requests", "Delivery API requests by result: the answer's "
    "status class (2xx, 3xx, 4xx, 5xx) or what went wrong (timeout, unreachable, "
    "tls_error, connection_failed).", ["result"])
API_LAST_ANSWER = Gauge(
    "mxmrelay_delivery_api_last_answer_timestamp_seconds", "When the delivery API last "
    "answered a send below 500 (not 401 or 403), Unix time.",
    multiprocess_mode="max")
DIRECTORY_LOOKUPS = Counter(
    "mxmrelay_directory_lookups", "Customer directory lookups at AUTH by result: found, "
    "not_found, error (the directory could not answer).", ["result"])
DIRECTORY_CACHE = Counter(
    "mxmrelay_directory_cache_lookups", "Lookups in the platform directory's cache by "
    "result: hit, negative_hit (a cached 'no such user'), miss (the platform is asked), "
    "shared (joined a request in flight), stale (the platform failed, a recent answer "
    "served), failed (the platform failed, nothing to serve).", ["result"])
RELOADS = Counter(
    "mxmrelay_reloads", "Reloads of the directory or the certificate, by what and result "
    "(ok, failed: the old one stays); counted by each process that reloads.",
    ["what", "result"])
RELOAD_LAST_SUCCESS = Gauge(
    "mxmrelay_reload_last_success_timestamp_seconds", "When the directory or certificate "
    "was last loaded successfully (at start or by a reload), Unix time.", ["what"],
    multiprocess_mode="max")
SERVING = Gauge(
    "mxmrelay_processes_serving", "Relay processes listening with their directory "
    "loaded (1 without workers; the live workers with them).",
    multiprocess_mode="livesum")


def multiprocess_dir() -> str | None:
    """The shared folder of multiprocess mode, when this process uses one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def use_multiprocess(path: str) -> None:
    """Write this process's values (and its children's: they inherit the
    environment) to files in ``path``.  Only values made after this call
    are shared: call it before any metric is recorded."""
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()


# -- the call sites' helpers --------------------------------------------------


def connection_opened(listener: str) -> None:
    CONNECTIONS.labels(listener).inc()
    CONNECTIONS_OPEN.labels(listener).inc()


def connection_closed(listener: str) -> None:
    CONNECTIONS_OPEN.labels(listener).dec()


def tls_established(listener: str, version: str | None) -> None:
    TLS_HANDSHAKES.labels(listener, version or "unknown").inc()


def tls_failed(listener: str) -> None:
    TLS_HANDSHAKE_FAILURES.labels(listener).inc()


def auth_attempt(result: str) -> None:
    assert result in AUTH_RESULTS, result
    AUTH_ATTEMPTS.labels(result).inc()


def auth_blocked(scope: str) -> None:
    """An AUTH refused by the ``address`` or ``user`` failure limit."""
    AUTH_BLOCKS.labels(scope).inc()
    AUTH_ATTEMPTS.labels("blocked").inc()


def transaction_ended(code: int, size: int | None = None) -> None:
    """A DATA ended with reply ``code``; ``size``: the bytes received."""
    outcome = "accepted" if code < 400 else "deferred" if code < 500 else "rejected"
    TRANSACTIONS.labels(outcome, str(code)).inc()
    if size is not None:
        MESSAGE_SIZE.observe(size)


def send_result(customer: str, code: int) -> None:
    """A send of customer space ``customer`` answered with reply ``code``."""
    result = "forwarded" if code < 400 else "deferred" if code < 500 else "refused"
    SENDS.labels(customer, result).inc()


def api_answered(status: int, now: float | None = None) -> None:
    """The delivery API answered a send with HTTP ``status``."""
    API_REQUESTS.labels(f"{status // 100}xx").inc()
    if status < 500 and status not in (401, 403):
        API_LAST_ANSWER.set(time.time() if now is None else now)


def api_failed(kind: str) -> None:
    """No answer: ``timeout``, ``unreachable``, ``tls_error``, ``connection_failed``."""
    API_REQUESTS.labels(kind).inc()


def directory_lookup(result: str) -> None:
    """``found``, ``not_found`` or ``error``."""
    DIRECTORY_LOOKUPS.labels(result).inc()


def directory_cache(result: str) -> None:
    """``hit``, ``negative_hit``, ``miss``, ``shared``, ``stale`` or ``failed``."""
    DIRECTORY_CACHE.labels(result).inc()


def reloaded(what: str, ok: bool, now: float | None = None) -> None:
    """A reload of ``what`` (``directory`` or ``certificate``) succeeded or
    failed (the old one stays)."""
    RELOADS.labels(what, "ok" if ok else "failed").inc()
    if ok:
        loaded(what, now)


def loaded(what: str, now: float | None = None) -> None:
    """``what`` was loaded successfully (at start, or by a reload)."""
    RELOAD_LAST_SUCCESS.labels(what).set(time.time() if now is None else now)
