"""The transactional reports as server-rendered HTML, for people.

Pure functions from stored sends to page bytes; :mod:`mxmrelay_refapi.web`
fetches the data and serves the pages.  Everything shown here was written by
customers' systems (tags, addresses, headers, bodies) and is hostile input,
so every interpolated value goes through :func:`html.escape` and the pages
are served with :data:`CONTENT_SECURITY_POLICY`, which forbids scripts,
images, frames and forms posting elsewhere even if escaping were ever missed.
No JavaScript is needed: the filters are a plain GET form and the pages
plain links.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from urllib.parse import quote, urlencode

from mxmrelay_refapi.contract import StoredSend
from mxmrelay_refapi.messages import body_parts, display_header, parse_headers, split_message
from mxmrelay_refapi.pages import SendPage
from mxmrelay_refapi.query import SendQuery

CONTENT_SECURITY_POLICY = b"default-src 'none'; style-src 'unsafe-inline'"

#: How much of a message the one-send page reads (headers and the body's start).
PREVIEW_BYTES = 1024 * 1024

#: The X-Mxm-Flags bits, in the order the platform documents them.
FLAG_NAMES = (
    (1, "open tracking"),
    (2, "click tracking"),
    (4, "global unsubscribe list check"),
    (8, "ignore global bounce list"),
)

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
.sandbox { background: #fd4; color: #000; padding: 0 .3em; border-radius: 3px; }
.sandbox-note { border: 2px solid #d90; background: #fff8d8; padding: .5em; }
.compare { display: flex; gap: 1em; } .compare section { flex: 1; overflow: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: .3em .5em;
         border-bottom: 1px solid #ddd; overflow-wrap: break-word; }
thead th { background: #f3f3f3; white-space: nowrap; }
td.id, td.received { white-space: nowrap; }
nav.pages { margin: 1em 0; }
td.tags, td.value { overflow-wrap: anywhere; }
table.meta th, table.headers th { width: 12em; white-space: nowrap; }
.tag { display: inline-block; background: #eef; border-radius: 3px;
       padding: 0 .4em; margin: 0 .2em .2em 0; text-decoration: none; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f8f8f8;
      padding: .6em; border: 1px solid #ddd; }
form.filter input { margin-right: .3em; }
.note { color: #666; } code { font-size: .95em; }
"""

# C0 controls other than tab and newline, and DEL: shown as U+FFFD.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def _e(value: object) -> str:
    """Escape anything for an HTML text node or a quoted attribute value."""
    text = str(value).replace("\r\n", "\n")
    return html.escape(_CONTROLS.sub("\ufffd", text), quote=True)


def describe_flags(flags: int | None) -> str:
    """``3`` -> ``"open tracking, click tracking"``; ``0`` -> ``"none"``."""
    if flags is None:
        return "n/a"
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    return ", ".join(names) if names else "none"


def _when(received_at: str) -> str:
    """``2025-01-02T03:04:05.678Z`` as ``2025-01-02 03:04:05 UTC``, for people."""
    return received_at[:19].replace("T", " ") + " UTC"


def _page(title: str, body: Iterable[str]) -> bytes:
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n",
            *body,
            "\n</body></html>\n",
        ]
    ).encode("utf-8")


def _tag_link(tag: str) -> str:
    href = "/?" + urlencode({"tag": tag})
    return f'<a class="tag" href="{_e(href)}">{_e(tag)}</a>'


def _tags(tags: Sequence[str]) -> str:
    return " ".join(_tag_link(t) for t in tags)


def render_index(page: SendPage, query: SendQuery, beside: str = "") -> bytes:
    """The list of sends, newest first, with the filter form and page links;
    ``beside``: the refused transactions' section (refusals.py)."""
    sends = page.sends
    out = ["<h1>Transactional sends</h1>\n", _filter_form(query)]
    shown = f"{len(sends)} send{'' if len(sends) == 1 else 's'}, newest first"
    if query.tags:
        shown += ", tagged " + ", ".join(f"<q>{_e(t)}</q>" for t in query.tags)
    if query.to is not None:
        shown += f", to or BCC <q>{_e(query.to)}</q>"
    if query.since is not None:
        shown += f", received from {_e(query.since.text)}"
    if query.until is not None:
        shown += f", received before {_e(query.until.text)}"
    if len(sends) == query.limit:
        shown += f" (at most {_e(query.limit)} a page)"
    out.append(f'<p class="summary">{shown}.</p>\n')
    if not sends:
        out.append('<p class="empty">No sends.</p>')
    else:
        out.append(
            '<table id="sends"><thead><tr><th>ID</th><th>Received</th><th>Subject</th>'
            "<th>Customer</th><th>From</th><th>To</th><th>BCC</th><th>Flags</th><th>Tags</th>"
            "</tr></thead>\n<tbody>\n"
        )
        out.extend(_index_row(send) for send in sends)
        out.append("</tbody></table>\n")
    out.append(_page_links(page, query))
    out.append(beside)
    return _page("Transactional sends", out)


def render_refusals_page(section: str) -> bytes:
    return _page("Refused transactions", ['<p><a href="/">All sends</a></p>\n', section])


def _filter_form(query: SendQuery) -> str:
    """A plain GET form: tags, recipient, received range (UTC); no cursor.

    A date input when the bound is empty or a date, so people get a date
    picker; a text input for a full timestamp, which a date input would
    drop when the form is sent again.
    """
    out = ['<form class="filter" method="get" action="/"><label>Tags (all must match): ']
    out.extend(f'<input name="tag" value="{_e(t)}">' for t in query.tags)
    out.append('<input name="tag" value="" placeholder="tag"></label> ')
    out.append(
        '<label>To or BCC: <input type="search" name="to" id="to" '
        f'value="{_e(query.to or "")}" placeholder="someone@example.org"></label> '
    )
    for name, label, bound in (
        ("since", "Received from (UTC, inclusive)", query.since),
        ("until", "before (UTC, exclusive)", query.until),
    ):
        text = "" if bound is None else bound.text
        kind = "date" if _DATE.fullmatch(text) or not text else "text"
        out.append(
            f'<label>{_e(label)}: <input type="{kind}" name="{name}" id="{name}" '
            f'value="{_e(text)}"></label> '
        )
    out.append(f'<input type="hidden" name="limit" value="{_e(query.limit)}">')
    out.append('<button type="submit">Filter</button> <a href="/">Clear</a></form>\n')
    return "".join(out)


_DATE = re.compile(r"\d{4}-\d\d-\d\d")


def _index_row(send: StoredSend) -> str:
    m = send.metadata
    href = "/sends/" + quote(m.id, safe="")
    subject = (
        '<span class="note">(no subject)</span>'
        if send.subject is None
        else _e(display_header(send.subject.encode("utf-8")))
    )
    return (
        f'<tr class="send{" sandbox" if m.sandbox else ""}" id="send-{_e(m.id)}">'
        f'<td class="id"><a href="{_e(href)}"><code>{_e(m.id)}</code></a>'
        f'{_SANDBOX_MARK if m.sandbox else ""}</td>'
        f'<td class="received"><time datetime="{_e(send.received_at)}">'
        f"{_e(_when(send.received_at))}</time></td>"
        f'<td class="subject">{subject}</td>'
        f'<td class="customer">{_e(m.customer)}</td>'
        f'<td class="from">{_e(m.mail_from)}</td>'
        f'<td class="to">{_e(m.to)}</td>'
        f'<td class="bcc">{_e(m.bcc or "")}</td>'
        f'<td class="flags" title="{_e(m.flags)}">{_e(describe_flags(m.flags))}</td>'
        f'<td class="tags">{_tags(m.tags)}</td></tr>\n'
    )


def _page_links(page: SendPage, query: SendQuery) -> str:
    """Newer (``after`` the first send) and older (``before`` the last) pages.

    The cursors come from the page, so a person paging back sees what was
    stored before they started, however much arrives meanwhile.
    """
    links = []
    if query.before is not None or query.after is not None:
        links.append(f'<a id="newest" href="{_e(_index_href(query.filters()))}">Newest</a>')
    if page.prev is not None:
        href = _index_href([*query.filters(), ("after", page.prev)])
        links.append(f'<a id="newer" rel="prev" href="{_e(href)}">← Newer</a>')
    if page.next is not None:
        href = _index_href([*query.filters(), ("before", page.next)])
        links.append(f'<a id="older" rel="next" href="{_e(href)}">Older →</a>')
    return f'<nav class="pages">{" · ".join(links)}</nav>' if links else ""


def _index_href(params: Sequence[tuple[str, str]]) -> str:
    return "/?" + urlencode(params)


def render_send(send: StoredSend, message: bytes) -> bytes:
    """One send: its metadata, its message's headers, and its text.

    ``message`` is the message's start (at most :data:`PREVIEW_BYTES`).
    """
    m = send.metadata
    raw = f"/v1/sends/{quote(m.id, safe='')}/message"
    out = [
        f"<h1>Send <code>{_e(m.id)}</code></h1>\n",
        _SANDBOX_NOTE if m.sandbox else "",
        f'<p><a href="/">All sends</a> · <a id="raw" href="{_e(raw)}">Raw message</a>'
        f" ({_e(send.size)} bytes)</p>\n",
        '<h2>Metadata</h2>\n<table class="meta" id="metadata">',
    ]
    client = m.client
    rows = [
        ("ID", f"<code>{_e(m.id)}</code>"),
        ("Received", _e(send.received_at)),
        ("Customer", _e(m.customer)),
        ("User", _e(m.user)),
        ("From", _e(m.mail_from)),
        ("Return-Path", _e(m.return_path)),
        ("To", _e(m.to)),
        ("BCC", _e(m.bcc or "none")),
        ("Flags", f"{_e(describe_flags(m.flags))} ({_e(m.flags)})"),
        (
            "BCC flags",
            _e(describe_flags(m.bcc_flags))
            + ("" if m.bcc_flags is None else f" ({_e(m.bcc_flags)})"),
        ),
        ("Tags", _tags(m.tags) or "none"),
        ("Message-ID", _e(m.message_id or "none")),
        ("Client", _e(f"{client.address} via {client.listener}, TLS {client.tls_version}")),
        ("Idempotency-Key", f"<code>{_e(send.idempotency_key)}</code>"),
        ("Size", f"{_e(send.size)} bytes"),
    ]
    out.extend(f"<tr><th>{_e(name)}</th><td>{value}</td></tr>" for name, value in rows)
    out.append("</table>\n")

    head, body = split_message(message)
    if send.submitted_headers is not None:
        # Side by side: as the client submitted it, as it would be delivered.
        out.append('<h2>Headers: submitted, and as delivered</h2>\n<div class="compare">'
                   '<section id="submitted"><h3>Submitted by the client</h3>'
                   f'<pre class="text">{_e(_text(send.submitted_headers))}</pre></section>'
                   '<section id="delivered"><h3>After the rules (as delivered)</h3>'
                   f'<pre class="text">{_e(_text(message[:len(head)]))}</pre></section>'
                   "</div>\n")
    out.append('<h2>Headers</h2>\n<table class="headers" id="headers">')
    out.extend(
        f'<tr><th class="name">{_e(name)}</th><td class="value">{_e(value)}</td></tr>'
        for name, value in parse_headers(head)
    )
    out.append("</table>\n")

    out.append('<h2>Body</h2>\n<section id="body">')
    if len(message) < send.size:
        out.append(
            f'<p class="note">Only the first {_e(len(message))} bytes are shown here; '
            f'see the <a href="{_e(raw)}">raw message</a>.</p>'
        )
    for label, text in body_parts(message, body):
        out.append(f'<h3 class="part">{_e(label)}</h3>')
        if text is not None:
            out.append(f'<pre class="text">{_e(text)}</pre>')
    out.append("</section>")
    return _page(f"Send {m.id}", out)


_SANDBOX_MARK = ' <span class="sandbox" title="stored and shown, never delivered">sandbox</span>'
_SANDBOX_NOTE = ('<p class="sandbox-note" id="sandbox"><strong>Sandbox send</strong>: made with '
                 "a sandbox credential, it went through every rule and is stored here, "
                 "but nothing was delivered, tracked or bounce-processed.</p>\n")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\r\n", "\n")


def render_error(status: int, message: str) -> bytes:
    body = f'<h1>{_e(status)}</h1>\n<p class="error">{_e(message)}</p>\n'
    return _page(str(status), [body, '<p><a href="/">All sends</a></p>'])
