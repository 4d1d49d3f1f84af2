"""proxy_next_upstream: parsing, inheritance and the pure retry decision."""

from __future__ import annotations

import pytest

from forklb.config import ConfigError
from forklb.config.loader import load
from forklb.http import next_upstream as nu
from forklb.http.next_upstream import NextUpstream, decide, mask_names, parse_mask

CONF = """
events {{ }}
http {{
    {http}
    upstream u {{ server 127.0.0.1:1; server 127.0.0.1:2; }}
    server {{
        listen 127.0.0.1:1;
        {server}
        location / {{ proxy_pass http://u; {location} }}
    }}
}}
"""


def _location(tmp_path, http="", server="", location=""):
    path = tmp_path / "forklb.conf"
    path.write_text(CONF.format(http=http, server=server, location=location))
    return load(str(path)).http.servers[0].locations[0]


def _error(tmp_path, location):
    with pytest.raises(ConfigError) as e:
        _location(tmp_path, location=location)
    return str(e.value)


# -- parsing --

def test_default_is_error_timeout(tmp_path):
    loc = _location(tmp_path)
    assert mask_names(loc.next_upstream.mask) == ("error", "timeout")
    assert (loc.next_upstream.tries, loc.next_upstream.timeout) == (0, 0.0)
    assert loc.proxy_http_version == "1.1"


def test_setting_replaces_the_default(tmp_path):
    loc = _location(tmp_path, location="proxy_next_upstream http_503;")
    assert mask_names(loc.next_upstream.mask) == ("http_503",)


def test_several_lines_add_up_as_nginx_bitmask(tmp_path):
    loc = _location(tmp_path, location="proxy_next_upstream error; "
                                       "proxy_next_upstream http_404 non_idempotent;")
    assert mask_names(loc.next_upstream.mask) == ("error", "http_404", "non_idempotent")


def test_off_wins(tmp_path):
    loc = _location(tmp_path, location="proxy_next_upstream error off http_500;")
    assert loc.next_upstream.mask == nu.OFF
    assert loc.next_upstream.retried_statuses() == frozenset()


def test_inherited_http_server_location(tmp_path):
    loc = _location(tmp_path, http="proxy_next_upstream http_502; proxy_next_upstream_tries 3;",
                    server="proxy_next_upstream_timeout 1m30s; proxy_http_version 1.0;")
    assert mask_names(loc.next_upstream.mask) == ("http_502",)
    assert loc.next_upstream == NextUpstream(nu.HTTP_502, 3, 90.0)
    assert loc.proxy_http_version == "1.0"
    # a location that sets its own replaces the inherited list
    loc = _location(tmp_path, http="proxy_next_upstream http_502;",
                    location="proxy_next_upstream timeout;")
    assert mask_names(loc.next_upstream.mask) == ("timeout",)


@pytest.mark.parametrize("directive, message", [
    ("proxy_next_upstream foo;", 'invalid value "foo" in '),
    ("proxy_next_upstream;", 'invalid number of arguments in "proxy_next_upstream" directive'),
    ("proxy_next_upstream_tries x;", '"proxy_next_upstream_tries" directive invalid number'),
    ("proxy_next_upstream_tries -1;", '"proxy_next_upstream_tries" directive invalid number'),
    ("proxy_next_upstream_timeout x;",
     '"proxy_next_upstream_timeout" directive invalid value'),
    ("proxy_http_version 2.0;", 'invalid value "2.0" in '),
    ("proxy_http_version 1.1 1.0;",
     'invalid number of arguments in "proxy_http_version" directive'),
    ("proxy_next_upstream_tries 1; proxy_next_upstream_tries 2;",
     '"proxy_next_upstream_tries" directive is duplicate'),
])
def test_errors_in_nginx_words_with_file_and_line(tmp_path, directive, message):
    text = _error(tmp_path, directive)
    assert message in text
    assert text.endswith("forklb.conf:9")  # the location line


def test_parse_mask_values():
    assert parse_mask(["error", "timeout"]) == nu.DEFAULT
    assert parse_mask(["http_429", "http_403"]) == nu.HTTP_429 | nu.HTTP_403
    with pytest.raises(nu.PolicyError):
        parse_mask(["http_501"])


def test_retried_statuses():
    policy = NextUpstream(parse_mask(["error", "http_503", "http_404"]))
    assert policy.retried_statuses() == frozenset({503, 404})
    assert NextUpstream().retried_statuses() == frozenset()


# -- the decision --

def _decide(mask=nu.DEFAULT, kind=nu.ERROR, tries=0, timeout=0.0, tries_done=1, peers=3,
            elapsed=0.0, sent=True, method=b"GET", body_gone=False):
    return decide(NextUpstream(mask, tries, timeout), kind, tries_done=tries_done, peers=peers,
                  elapsed=elapsed, sent=sent, method=method, body_gone=body_gone)


def test_listed_kinds_retry_unlisted_do_not():
    assert _decide(kind=nu.ERROR)
    assert _decide(kind=nu.TIMEOUT)
    assert not _decide(kind=nu.INVALID_HEADER)
    assert not _decide(kind=nu.HTTP_503)
    assert _decide(mask=nu.HTTP_503, kind=nu.HTTP_503)
    assert not _decide(mask=nu.HTTP_503, kind=nu.ERROR)  # error not listed: no retry
    assert not _decide(mask=nu.OFF, kind=nu.ERROR)


def test_tries_every_peer_at_most_once_then_the_limit():
    assert _decide(tries_done=2, peers=3)
    assert not _decide(tries_done=3, peers=3)
    assert not _decide(tries_done=1, peers=1)  # a single server is never retried
    assert not _decide(tries=2, tries_done=2, peers=5)
    assert _decide(tries=0, tries_done=4, peers=5)  # 0: no limit beyond the peers


def test_timeout_measured_from_the_first_attempt():
    assert _decide(timeout=2.0, elapsed=1.9)
    assert not _decide(timeout=2.0, elapsed=2.0)
    assert _decide(timeout=0.0, elapsed=1e6)


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"LOCK"])
def test_sent_non_idempotent_needs_non_idempotent(method):
    assert not _decide(method=method, sent=True)
    assert _decide(method=method, sent=False)  # a refused connect sent nothing
    assert _decide(mask=nu.DEFAULT | nu.NON_IDEMPOTENT, method=method, sent=True)
    assert not _decide(mask=nu.HTTP_503, kind=nu.HTTP_503, method=method)
    assert _decide(mask=nu.HTTP_503 | nu.NON_IDEMPOTENT, kind=nu.HTTP_503, method=method)


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE", b"PROPFIND"])
def test_other_methods_count_as_idempotent(method):
    assert _decide(method=method, sent=True)


def test_streamed_body_is_never_replayed():
    assert not _decide(body_gone=True)
    assert not _decide(mask=nu.DEFAULT | nu.NON_IDEMPOTENT, method=b"POST", body_gone=True)


def test_failure_accounting_and_give_up_status():
    for kind in (nu.ERROR, nu.TIMEOUT, nu.INVALID_HEADER, nu.HTTP_500, nu.HTTP_502,
                 nu.HTTP_503, nu.HTTP_504, nu.HTTP_429):
        assert nu.counts_as_failure(kind)
    assert not nu.counts_as_failure(nu.HTTP_403)
    assert not nu.counts_as_failure(nu.HTTP_404)
    assert nu.give_up_status(nu.TIMEOUT) == 504
    assert nu.give_up_status(nu.ERROR) == 502
    assert nu.give_up_status(nu.INVALID_HEADER) == 502
