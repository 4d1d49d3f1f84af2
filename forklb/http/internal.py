"""Internal redirects and ``error_page``, as ``ngx_http_internal_redirect`` and
``ngx_http_special_response_handler``.

An internal redirect gives the same exchange a new URI (and arguments), looks the
location up again in the same server and runs it, access rules included.  Index
files, try_files fallbacks and error pages use it; named locations (``@name``)
are reached directly, with URI and method unchanged.  At most
:data:`MAX_REDIRECTS` happen per request, then 500, as nginx.

``error_page``: when forklb itself generates an error status (404, 403, 502,
504, 413, a ``return CODE``...) in a location that has a page for it, the page
is served instead.  With recursive_error_pages off (nginx's default, the only
mode here), a request gets at most one error page: an error while serving the
page gives the built-in one.  Responses relayed from an upstream are not
intercepted (that would be ``proxy_intercept_errors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from forklb.model import ErrorPage, access_allows

if TYPE_CHECKING:
    from forklb.http.connection import ClientConnection, Exchange

MAX_REDIRECTS = 10  # NGX_HTTP_MAX_URI_CHANGES
REDIRECT_CODES = (301, 302, 303, 307, 308)


def redirect(conn: ClientConnection, ex: Exchange, uri: str, args: str | None) -> None:
    """Serve ``ex`` again as ``uri`` (``args`` replace the query unless None)."""
    if not _count(conn, ex, f'internally redirecting to "{uri}"'):
        return
    ex.uri = uri
    if args is not None:
        ex.args = args
    ex.location = conn.worker.matchers[id(ex.server)].match(uri)
    run(conn, ex)


def named(conn: ClientConnection, ex: Exchange, name: str) -> None:
    """Serve ``ex`` in the server's ``location @name``; URI and method are kept."""
    loc = ex.server.named.get(name)
    if loc is None:
        conn.worker.log.error(f'could not find named location "{name}", client: '
                              f'{conn.remote_addr}, server: {ex.server_name}, request: '
                              f'"{ex.request_line}"')
        conn.respond_simple(ex, 500)
        return
    if not _count(conn, ex, f'redirect to named location "{name}"'):
        return
    ex.location = loc
    run(conn, ex)


def run(conn: ClientConnection, ex: Exchange) -> None:
    """Run ``ex.location``: its access rules, then its content handler."""
    loc = ex.location
    if loc.access and not access_allows(loc.access, conn.remote_addr):
        conn.worker.log.error(f"access forbidden by rule, client: {conn.remote_addr}, "
                              f'server: {ex.server_name}, request: "{ex.request_line}"')
        conn.respond_simple(ex, 403)
        return
    runtime = conn.worker.locations[id(loc)]
    runtime.handler(conn, ex, runtime)


def split_args(uri: str) -> tuple[str, str]:
    """``/path?args`` -> (path, args); without ``?`` the arguments are empty, as nginx."""
    path, _, args = uri.partition("?")
    return path, args


def intercept(conn: ClientConnection, ex: Exchange, status: int) -> bool:
    """Serve the location's error page for ``status``; False when there is none.

    Called by ``respond_simple`` for built-in error responses.
    """
    ex.error_paged = True  # nginx sets it once a location has error pages, matched or not
    page: ErrorPage | None = ex.location.error_pages.get(status)
    if page is None or ex.redirects >= MAX_REDIRECTS:
        return False
    ex.err_status = status if page.overwrite < 0 else page.overwrite
    uri = page.uri.render(ex)
    if uri.startswith("/"):
        if ex.method_b != b"HEAD":
            ex.request_method_b = ex.request_method_b or ex.method_b  # $request keeps it
            ex.method_b = b"GET"
        redirect(conn, ex, *split_args(uri))
    elif uri.startswith("@"):
        named(conn, ex, uri)
    else:
        code = page.overwrite if page.overwrite in REDIRECT_CODES else 302
        ex.err_status = 0
        conn.respond_simple(ex, code, extra=((b"Location", uri.encode("latin-1", "replace")),))
    if conn.must_close and not ex.complete:
        conn.linger = True  # as respond_simple does: unread input must not reset the answer
    return True


def _count(conn: ClientConnection, ex: Exchange, what: str) -> bool:
    ex.redirects += 1
    if ex.redirects <= MAX_REDIRECTS:
        return True
    conn.worker.log.error(f"rewrite or internal redirection cycle while {what}, client: "
                          f'{conn.remote_addr}, server: {ex.server_name}, request: '
                          f'"{ex.request_line}"')
    conn.respond_simple(ex, 500)
    return False
