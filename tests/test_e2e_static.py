"""Static files and error_page end to end, side by side with Debian's nginx.

Each test writes a small site under ``tmp_path`` (fixed mtimes, so ETags and
Last-Modified are stable), runs forklb and nginx with the same ``server`` body
on it, sends both the same requests and compares status, the headers that
matter (Content-Type, Content-Length, Last-Modified, ETag, Accept-Ranges,
Content-Range, Location with the port swapped) and the body.  Built-in error
pages differ in their signature line (``nginx/1.22.1`` vs ``forklb``), so for
those only the status and headers other than Content-Length are compared.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from harness import HttpClient, free_port, http_request, wait_for, wait_port

MTIME = 1_700_000_000
BIG = 3 * 1024 * 1024 + 17  # well above the single-write threshold: goes through sendfile

FORKLB_CONF = """
worker_processes 1;
events {{ }}
http {{
    access_log off;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port};
        {body}
    }}
}}
"""

COMPARED = ("content-type", "content-length", "last-modified", "etag", "accept-ranges",
            "content-range", "location")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """www/ (the root) and other/ (outside it), every file with mtime MTIME."""
    www, other = tmp_path / "www", tmp_path / "other"
    files = {
        "www/index.html": "hello world\n",
        "www/ten.txt": "0123456789",
        "www/404.html": "custom not found\n",
        "www/50x.html": "custom server error\n",
        "www/style.css": "body{}",
        "www/dir/index.html": "dir index\n",
        "www/idx/b.html": "second index\n",
        "www/zero.txt": "",
        "www/app/index.html": "spa shell\n",
        "other/o.txt": "other file\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (www / "empty").mkdir()
    (www / "big.bin").write_bytes(os.urandom(BIG))
    (www / "link").symlink_to(other)  # leaves the root: followed, as nginx does
    for path in tmp_path.rglob("*"):
        if path.parent.name in ("www", "other", "dir", "idx", "app", "empty") or path == www:
            os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return tmp_path


def _pair(forklb_factory, nginx_backend_factory, body: str) -> tuple[int, int]:
    """forklb and nginx serving the same ``server`` body; returns (forklb, nginx) ports."""
    nport = free_port()
    nginx_backend_factory(extra_servers=f"server {{ listen 127.0.0.1:{nport}; {body} }}")
    wait_port(nport)
    fport = free_port()
    lb = forklb_factory(FORKLB_CONF.format(port=fport, body=body))
    lb.start(wait_ports=[fport], workers=1)
    return fport, nport


def _builtin(resp) -> bool:
    return b"<hr><center>" in resp.body


def _compare(fport: int, nport: int, path: str, method: str = "GET",
             headers: dict | None = None, body: bytes = b"") -> list[str]:
    """Differences between forklb's and nginx's answers to one request."""
    ours = http_request(fport, path, method=method, headers=headers, body=body)
    ref = http_request(nport, path, method=method, headers=headers, body=body)
    what = f"{method} {path} {headers or ''}"
    if ours.status != ref.status:
        return [f"{what}: status {ours.status} != nginx {ref.status}"]
    out = []
    builtin = _builtin(ref)
    for name in COMPARED:
        if builtin and name == "content-length":
            continue
        mine, theirs = ours.header(name), ref.header(name)
        if name == "location" and theirs is not None:
            theirs = theirs.replace(f":{nport}", f":{fport}")
        if mine != theirs:
            out.append(f"{what}: {name} {mine!r} != nginx {theirs!r}")
    if not builtin and ours.body != ref.body:
        out.append(f"{what}: body {ours.body[:60]!r} != nginx {ref.body[:60]!r}")
    if builtin and not _builtin(ours) and method != "HEAD":
        out.append(f"{what}: not a built-in page: {ours.body[:60]!r}")
    return out


def _check(fport: int, nport: int, cases: list) -> None:
    problems: list[str] = []
    for case in cases:
        path, *rest = case if isinstance(case, tuple) else (case,)
        method = next((r for r in rest if isinstance(r, str)), "GET")
        headers = next((r for r in rest if isinstance(r, dict)), None)
        body = next((r for r in rest if isinstance(r, bytes)), b"")
        problems += _compare(fport, nport, path, method, headers, body)
    assert not problems, "\n".join(problems)


STATIC_BODY = """
    types {{ text/html html; text/css css; }}
    root {www};
    location /al/ {{ alias {other}/; }}
    location = /exact.txt {{ alias {other}/o.txt; }}
    location /idx/ {{ index a.html b.html; }}
    location /nosf/ {{ alias {www}/; sendfile off; }}
"""


def test_files_directories_and_alias_like_nginx(site, forklb_factory, nginx_backend_factory):
    body = STATIC_BODY.format(www=site / "www", other=site / "other")
    fport, nport = _pair(forklb_factory, nginx_backend_factory, body)
    _check(fport, nport, [
        "/", "/index.html", "/ten.txt", "/style.css", "/zero.txt", "/big.bin", "/nosf/big.bin",
        ("/ten.txt", "HEAD"), ("/big.bin", "HEAD"),
        "/dir", "/dir?a=1&b=2", "/dir/", "/empty/", "/missing/", "/missing", "/ten.txt/x",
        "/al/o.txt", "/al/", "/al/missing", "/exact.txt", "/idx/", "/link/o.txt",
        ("/ten.txt", "POST"), ("/missing", "POST"), ("/ten.txt", "PUT"), ("/", "DELETE"),
    ])


def test_ranges_and_conditional_requests_like_nginx(site, forklb_factory,
                                                    nginx_backend_factory):
    body = STATIC_BODY.format(www=site / "www", other=site / "other")
    fport, nport = _pair(forklb_factory, nginx_backend_factory, body)
    tag = f'"{MTIME:x}-{10:x}"'
    lm = "Tue, 14 Nov 2023 22:13:20 GMT"  # MTIME
    cases = [("/ten.txt", {"Range": r}) for r in (
        "bytes=2-4", "bytes=2-", "bytes=-3", "bytes=-30", "bytes=0-99", "bytes=9-9",
        "bytes=10-", "bytes=5-2", "bytes=-0", "bytes=0-0,-0", "bytes=a-b", "items=1-2")]
    cases += [
        ("/zero.txt", {"Range": "bytes=0-"}), ("/zero.txt", {"Range": "bytes=1-1"}),
        ("/big.bin", {"Range": "bytes=1000000-2000000"}), ("/big.bin", {"Range": "bytes=-70000"}),
        ("/nosf/big.bin", {"Range": "bytes=1000000-2000000"}),
        ("/ten.txt", "HEAD", {"Range": "bytes=1-2"}),
        ("/ten.txt", {"Range": "bytes=1-2", "If-Range": tag}),
        ("/ten.txt", {"Range": "bytes=1-2", "If-Range": '"stale"'}),
        ("/ten.txt", {"Range": "bytes=1-2", "If-Range": lm}),
        ("/ten.txt", {"If-None-Match": tag}), ("/ten.txt", {"If-None-Match": f'"x", W/{tag}'}),
        ("/ten.txt", {"If-None-Match": "*"}), ("/ten.txt", {"If-None-Match": '"x"'}),
        ("/ten.txt", {"If-Modified-Since": lm}),
        ("/ten.txt", {"If-Modified-Since": "Wed, 15 Nov 2023 00:00:00 GMT"}),
        ("/ten.txt", {"If-Modified-Since": lm, "If-None-Match": '"x"'}),
        ("/ten.txt", {"If-Match": '"x"'}), ("/ten.txt", {"If-Match": tag}),
        ("/ten.txt", {"If-Unmodified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}),
        ("/ten.txt", {"Range": "bytes=3-", "If-None-Match": tag}),
    ]
    _check(fport, nport, cases)
    # the 304 carries no body and no Content-Length, and the connection stays usable
    with HttpClient(fport) as client:
        r = client.get("/ten.txt", {"If-None-Match": tag})
        assert r.status == 304 and r.body == b"" and not r.has_header("content-length")
        assert r.header("etag") == tag and r.header("last-modified") == lm
        assert client.get("/ten.txt").body == b"0123456789"


def test_big_files_over_sendfile_and_read_on_one_connection(site, forklb_factory):
    port = free_port()
    body = STATIC_BODY.format(www=site / "www", other=site / "other")
    forklb_factory(FORKLB_CONF.format(port=port, body=body)).start(wait_ports=[port], workers=1)
    expected = (site / "www" / "big.bin").read_bytes()
    with HttpClient(port, timeout=30) as client:
        for path in ("/big.bin", "/nosf/big.bin", "/big.bin"):
            r = client.get(path)
            assert r.status == 200 and len(r.body) == BIG, path
            assert hashlib.sha256(r.body).digest() == hashlib.sha256(expected).digest(), path
        r = client.get("/big.bin", {"Range": "bytes=100000-"})
        assert r.status == 206 and r.body == expected[100000:]
        assert r.header("content-range") == f"bytes 100000-{BIG - 1}/{BIG}"


ERROR_BODY = """
    types {{ text/html html; }}
    root {www};
    error_page 404 /404.html;
    error_page 500 502 503 504 /50x.html;
    location /keep/ {{ error_page 404 =200 /404.html; }}
    location /own/ {{ error_page 404 = /ten.txt; }}
    location /url/ {{ error_page 404 http://example.com/gone; }}
    location /url301/ {{ error_page 404 =301 http://example.com/gone; }}
    location /loop/ {{ error_page 404 /loop/missing; }}
    location /ret/ {{ return 404; }}
    location /deny/ {{ deny all; error_page 403 /404.html; }}
    location /dead/ {{ proxy_pass http://127.0.0.1:{dead}; }}
    location /up/ {{ proxy_pass http://127.0.0.1:{upstream}; }}
    location /icpt/ {{ proxy_pass http://127.0.0.1:{upstream}; proxy_intercept_errors on; }}
    location /icpt-other/ {{
        proxy_pass http://127.0.0.1:{upstream}; proxy_intercept_errors on; error_page 500 /50x.html;
    }}
    location /app/ {{ try_files $uri $uri/ /app/index.html; }}
    location /tf/ {{ try_files $uri =404; }}
    location /tfa/ {{ alias {other}/; try_files $uri =403; }}
    location /cyc/ {{ try_files /nothing /cyc/x; }}
    location /named/ {{ try_files $uri @back; }}
    location /enamed/ {{ error_page 404 = @back; }}
    location @back {{ proxy_pass http://127.0.0.1:{upstream}; }}
    location /tfret/ {{ try_files $uri =404; return 200 "returned"; }}
    location /small/ {{ client_max_body_size 1; error_page 413 /404.html; }}
"""


def test_error_page_and_try_files_like_nginx(site, forklb_factory, nginx_backend_factory):
    upstream = nginx_backend_factory("upstream says no", status=404)
    body = ERROR_BODY.format(www=site / "www", other=site / "other", dead=free_port(),
                             upstream=upstream.port)
    fport, nport = _pair(forklb_factory, nginx_backend_factory, body)
    _check(fport, nport, [
        "/missing", ("/missing", "HEAD"), ("/missing", "POST"), "/missing/",
        "/keep/x", "/own/x", "/url/x", "/url301/x", "/loop/x", "/ret/x", "/deny/x",
        "/dead/x", ("/dead/x", "HEAD"),
        "/up/x",  # the upstream's own 404 is relayed, not replaced (no proxy_intercept_errors)
        "/icpt/x", ("/icpt/x", "HEAD"), "/icpt-other/x",  # replaced only with a page for it
        "/app/", "/app/route/deep", "/app/index.html", "/tf/x", "/tfa/o.txt", "/tfa/x",
        "/cyc/a", "/named/x", "/enamed/x", ("/small/x", "POST", b"too big"),
        "/tfret/x",
    ])


def test_named_location_keeps_method_and_uri(site, forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo", name="echo1")
    port = free_port()
    body = ERROR_BODY.format(www=site / "www", other=site / "other", dead=free_port(),
                             upstream=echo.port)
    forklb_factory(FORKLB_CONF.format(port=port, body=body)).start(wait_ports=[port], workers=1)
    r = http_request(port, "/named/x?q=1", method="POST", body=b"abc")
    assert r.status == 200
    assert (r.json()["method"], r.json()["path"], r.json()["body"]) == ("POST", "/named/x?q=1",
                                                                         "abc")
    # error_page to a URI: GET, the page's URI, no arguments; the error's status stays
    r = http_request(port, "/missing?q=1", method="POST", body=b"abc")
    assert (r.status, r.body) == (404, b"custom not found\n")


def test_error_page_is_per_level_and_not_recursive(site, forklb_factory):
    body = f"""
        access_log logs/access.log fmt;
        root {site / "www"};
        error_page 404 /404.html;
        location /own/ {{ error_page 500 /50x.html; }}
        location /inherit/ {{ }}
        location /twice/ {{ error_page 404 /twice/missing.html; }}
    """
    port = free_port()
    conf = FORKLB_CONF.format(port=port, body=body).replace(
        "access_log off;", "log_format fmt '$request|$request_method|$uri|$status';")
    lb = forklb_factory(conf)
    lb.start(wait_ports=[port], workers=1)
    r = http_request(port, "/inherit/x", method="POST", body=b"x")
    assert (r.status, r.body) == (404, b"custom not found\n")
    # the log shows the request as received, the method and URI as served (nginx's way)
    wait_for(lambda: "|" in _read(lb.path("logs/access.log")), timeout=5)
    assert _read(lb.path("logs/access.log")).splitlines()[0] == \
        "POST /inherit/x HTTP/1.1|GET|/404.html|404"
    r = http_request(port, "/own/x")  # its own error_page list replaces the server's
    assert r.status == 404 and _builtin(r)
    r = http_request(port, "/twice/x")  # the page is missing too: built-in, no second redirect
    assert r.status == 404 and _builtin(r)


def test_unreadable_file_is_403(forklb_factory):
    # Root reads everything, so the workers run as nobody (when the tests run as root)
    # on a site outside tmp_path, whose parents only root may enter.
    site = Path(tempfile.mkdtemp(prefix="forklb-static-"))
    try:
        site.chmod(0o755)
        (site / "open.txt").write_text("readable\n")
        (site / "closed.txt").write_text("secret\n")
        (site / "closed.txt").chmod(0o000)
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        port = free_port()
        conf = FORKLB_CONF.format(port=port, body=f"root {site};").replace(
            "worker_processes 1;", f"worker_processes 1; {user}")
        lb = forklb_factory(conf)
        lb.start(wait_ports=[port], workers=1)
        assert http_request(port, "/open.txt").status == 200
        assert http_request(port, "/closed.txt").status == 403
        assert http_request(port, "/absent.txt").status == 404
        assert f'open() "{site}/closed.txt" failed (13: Permission denied)' in lb.error_log()
    finally:
        shutil.rmtree(site, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
