"""``return CODE [TEXT|URL]``: answering from the config, as nginx's rewrite module.

* 301, 302, 303, 307, 308 with a URL: a redirect; a URL starting with ``/`` is
  made absolute with the request's host (and port unless 80), as nginx's
  ``absolute_redirect on``.
* any other code with TEXT: TEXT as the body, with the location's default_type.
* a code alone: its standard page if nginx has one; below 300 an empty body with
  the default_type (204: no Content-Type, no Content-Length); otherwise an empty
  body without Content-Type, as nginx.
* 444: the connection is closed without a response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from forklb.http.connection import ClientConnection, Exchange

if TYPE_CHECKING:
    from forklb.worker import LocationRuntime

REDIRECTS = (301, 302, 303, 307, 308)
# The codes nginx has a built-in page for (ngx_http_error_pages, nginx 1.22).
PAGES = frozenset({301, 302, 303, 307, 308, *range(400, 407), *range(408, 417), 421, 429,
                   *range(500, 506), 507})
CLOSE_WITHOUT_RESPONSE = 444


def absolute(url: str, ex: Exchange) -> str:
    """``url`` as the Location header carries it."""
    if not url.startswith("/"):
        return url
    port = ex.server_port
    scheme = ex.scheme
    authority = ex.host if port == (443 if scheme == "https" else 80) else f"{ex.host}:{port}"
    return f"{scheme}://{authority}{url}"


def serve_return(conn: ClientConnection, ex: Exchange, rt: LocationRuntime) -> None:
    code, template = ex.location.return_
    text = template.render(ex) if template is not None else None
    if code == CLOSE_WITHOUT_RESPONSE:
        ex.status = code
        conn.must_close = True
        return
    if code in REDIRECTS and text is not None:
        location = absolute(text, ex).encode("latin-1", "replace")
        conn.respond_simple(ex, code, extra=((b"Location", location),))
    elif text is not None:
        conn.respond_simple(ex, code, text.encode("utf-8"),
                            ex.location.default_type.encode("latin-1"))
    elif code < 300:
        conn.respond_simple(ex, code, b"", ex.location.default_type.encode("latin-1"))
    elif code in PAGES:
        conn.respond_simple(ex, code)
    else:
        conn.respond_simple(ex, code, b"", None)
