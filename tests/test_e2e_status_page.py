"""/status in Debian's headless Chromium: the page's JavaScript fills the tables
from /status.json, and the test reads the upstream table from the DOM.

The screenshot is kept in ``$FORKLB_TEST_ARTIFACTS`` (default: ``test-artifacts/``
in the repository) as ``status-page.png``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

from harness import REPO_ROOT, HttpClient, free_port, http_request

ARTIFACTS = Path(os.environ.get("FORKLB_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]

CONF = """
worker_processes 2;
error_log logs/error.log notice;
events {{ }}
sidecar {{ listen 127.0.0.1:{side}; }}
http {{
    access_log off;
    upstream app {{
        server 127.0.0.1:{backend} weight=3;
        server 127.0.0.1:{dead};
        server 127.0.0.1:{backend2} down;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; }}
    }}
}}
"""


class Tables(HTMLParser):
    """Rows of every <table class="upstream">, by its data-upstream name."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: list[list[str]] | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "upstream" in (a.get("class") or "").split():
            self.current = self.tables.setdefault(a.get("data-upstream", ""), [])
        elif tag == "tr" and self.current is not None:
            self.current.append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.current is not None:
            self.current[-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=3000", *args, url],
                          capture_output=True, text=True, timeout=90, cwd=tmp_path)


def test_status_page_shows_upstream_table_in_chromium(tmp_path, forklb_factory,
                                                      py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    backend2 = py_backend_factory("name", name="b2")
    port, side, dead = free_port(), free_port(), free_port()
    lb = forklb_factory(CONF.format(side=side, backend=backend.port, backend2=backend2.port,
                                    dead=dead, port=port))
    lb.start(wait_ports=[port, side], workers=2)
    with HttpClient(port) as client:
        for _ in range(30):
            assert client.get("/").status == 200
    page = http_request(side, "/status", headers={"Accept": "text/html"})
    assert page.status == 200 and b"<script" in page.body
    assert b"http://" not in page.body and b"https://" not in page.body  # no external assets

    url = f"http://127.0.0.1:{side}/status"
    dom = chromium(tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = Tables()
    parser.feed(dom.stdout)
    assert list(parser.tables) == ["app"], dom.stdout[:3000]
    header, *rows = parser.tables["app"]
    assert header[:4] == ["server", "state", "weight", "active"]
    assert header[4:] == ["req/s", "error rate", "p50", "p99", "last check"]
    by_server = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert set(by_server) == {f"127.0.0.1:{p}" for p in (backend.port, dead, backend2.port)}
    good = by_server[f"127.0.0.1:{backend.port}"]
    assert good["state"] == "up" and good["weight"] == "3"
    assert good["p50"].endswith(" ms") and good["p99"].endswith(" ms")
    assert by_server[f"127.0.0.1:{dead}"]["state"] == "failed"
    assert by_server[f"127.0.0.1:{backend2.port}"]["state"] == "down"
    assert 'id="requests">30<' in dom.stdout
    assert dom.stdout.count("<td>worker</td>") == 2

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "status-page.png"
    r = chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,800",
                 "--hide-scrollbars")
    assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copyfile(shot, ARTIFACTS / "status-page.png")
