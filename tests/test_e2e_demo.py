"""The shipped demo (conf/forklb.conf) runs as README says: lb01 + web01/web02 on loopback."""

from __future__ import annotations

import shutil

from harness import REPO_ROOT, free_port, http_request


def test_demo_alternates_121_122_for_www_and_bbs(forklb_factory):
    text = (REPO_ROOT / "conf" / "forklb.conf").read_text()
    ports = {old: free_port() for old in (8080, 8081, 8082)}
    for old, new in ports.items():
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    lb = forklb_factory(text)
    shutil.copytree(REPO_ROOT / "conf" / "html", lb.prefix / "conf" / "html")
    assert lb.cli("-t").returncode == 0
    lb.start(wait_ports=list(ports.values()))
    lb_port = ports[8080]

    www = [http_request(lb_port, "/", host="www.chaoge.com").text for _ in range(4)]
    assert www == ["chaoge_www_121\n", "chaoge_www_122\n"] * 2
    bbs = [http_request(lb_port, "/", host="bbs.chaoge.com").text for _ in range(2)]
    assert sorted(bbs) == ["chaoge_bbs_121\n", "chaoge_bbs_122\n"]

    r = http_request(lb_port, "/missing.html", host="www.chaoge.com")
    assert r.status == 404
    r = http_request(ports[8081], "/index.html", host="www.chaoge.com")
    assert r.status == 200 and r.header("content-type") == "text/html"
    assert r.text == "chaoge_www_121\n"
    access = (lb.prefix / "logs" / "access.log")
    lb.cli("-s", "quit")
    lb.stop()
    assert 'GET / HTTP/1.1" 200 15' in access.read_text()
    assert "upstream=127.0.0.1:" in access.read_text()
