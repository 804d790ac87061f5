"""Server-rendered pages: plain HTML, one stylesheet from the portal itself, no script, no
inline style (the Content-Security-Policy forbids both). Every value is escaped here."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from .search import iso


def e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def url(path: str, params: Mapping[str, str] | None = None) -> str:
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in path.split("/"))
    return quoted + ("?" + urllib.parse.urlencode(params) if params else "")


def layout(title: str, body: str, *, user: str | None = None, csrf: str | None = None,
           namespace: str | None = None) -> str:
    nav = ""
    if user is not None:
        links = ['<a href="/">Namespaces</a>']
        if namespace:
            base = f"/ns/{namespace}"
            links += [f'<a href="{e(url(base + "/" + page))}">{e(label)}</a>'
                      for page, label in (("logs", "Message log"),
                                          ("figures", "Figures"),
                                          ("resources", "Credentials & domains"),
                                          ("suppression", "Suppression"),
                                          ("erasures", "Erasure"), ("audit", "Audit log"))]
        logout = (f'<form method="post" action="/logout" class="inline">'
                  f'<input type="hidden" name="csrf" value="{e(csrf)}">'
                  f'<button type="submit" id="logout">Log out</button></form>')
        nav = (f'<nav><span class="brand">Mailplane</span>{"".join(links)}'
               f'<span class="user">{e(user)}</span>{logout}</nav>')
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)} · Mailplane</title>"
            "<link rel=\"stylesheet\" href=\"/static/portal.css\"></head>"
            f"<body>{nav}<main><h1>{e(title)}</h1>{body}</main></body></html>")


def error_box(message: str) -> str:
    return f'<p class="error" role="alert">{e(message)}</p>'


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], *, cls: str = "") -> str:
    """``rows`` hold HTML already escaped by the caller."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table class="{e(cls)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def when(ts: Any) -> str:
    return e(iso(float(ts)))
