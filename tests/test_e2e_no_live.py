"""When every server has failed: 502 at once, 'no live upstreams', no connection made."""

from __future__ import annotations

import time

from harness import free_port, http_request


def _lb(forklb_factory, ports):
    port = free_port()
    servers = " ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in ports)
    lb = forklb_factory(f"""
        worker_processes 1;
        events {{ }}
        http {{
            access_log off;
            upstream app {{ {servers} }}
            server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://app; }} }}
        }}""")
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def test_all_failed_means_502_at_once_without_connecting(forklb_factory, hangup_factory):
    a, b = hangup_factory(), hangup_factory()
    lb, port = _lb(forklb_factory, [a.port, b.port])
    assert http_request(port).status == 502  # both tried, both failed
    assert (len(a.accepts), len(b.accepts)) == (1, 1)
    t0 = time.monotonic()
    assert http_request(port).status == 502
    assert time.monotonic() - t0 < 0.5
    assert (len(a.accepts), len(b.accepts)) == (1, 1)  # nobody was contacted
    assert "no live upstreams while connecting to upstream" in lb.error_log()


def test_a_single_server_is_never_marked_failed(forklb_factory, hangup_factory):
    only = hangup_factory()
    lb, port = _lb(forklb_factory, [only.port])
    for n in range(1, 4):
        assert http_request(port).status == 502
        assert len(only.accepts) == n  # tried every time: nginx never disables the only server
    assert "no live upstreams" not in lb.error_log()
