"""Locations inside locations: nginx's lookup order and config checks (unit level).

The differential suite (tests/test_diff_nginx.py) checks the same against nginx 1.22.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from forklb.config import ConfigError
from forklb.config.loader import load
from forklb.http.routing import LocationMatcher


@dataclass(eq=False)
class Loc:
    modifier: str
    pattern: str
    name: str
    nested: tuple[Loc, ...] = ()
    regex: re.Pattern[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.modifier in ("~", "~*"):
            self.regex = re.compile(self.pattern, re.IGNORECASE if self.modifier == "~*" else 0)


def _tree() -> LocationMatcher[Loc]:
    inner_png = Loc("~", r"\.png$", "inner-png")
    caret = Loc("^~", "/a/caret/", "inner-caret")
    deep = Loc("", "/a/b/c/", "deep")
    b = Loc("", "/a/b/", "b", nested=(deep,))
    a = Loc("", "/a/", "a", nested=(b, caret, Loc("=", "/a/exact", "inner-exact"), inner_png))
    s = Loc("^~", "/s/", "s", nested=(Loc("~", r"\.gif$", "s-gif"),))
    top_regex = Loc("~", r"\.(png|jpg)$", "top-img")
    # flat, as Server.locations lists them: outer first, then the nested ones
    return LocationMatcher([a, s, top_regex, b, caret, inner_png, deep, Loc("", "", "server")])


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("/a/x", "a"),
        ("/a/b/x", "b"),
        ("/a/b/c/x", "deep"),
        ("/a/exact", "inner-exact"),
        ("/a/b/x.png", "inner-png"),  # a nested regex comes before the outer ones
        ("/a/b/x.jpg", "top-img"),  # then the outer regexes
        ("/a/caret/x.jpg", "top-img"),  # an inner ^~ only skips the inner regexes
        ("/a/caret/x.png", "top-img"),  # (nginx 1.22 does the same)
        ("/a/caret/x.gif", "inner-caret"),
        ("/s/x.gif", "s-gif"),  # a ^~ prefix's own nested regexes still count
        ("/s/x.png", "s"),  # ... but the outer regexes do not
        ("/x.png", "top-img"),
        ("/other", "server"),
    ],
)
def test_nested_lookup_order(uri: str, name: str) -> None:
    assert _tree().match(uri).name == name


def _load(tmp_path: Path, locations: str):
    text = ("events {}\nhttp {\nserver {\nlisten 127.0.0.1:8080;\n" + locations + "\n}\n}\n")
    (tmp_path / "nginx.conf").write_text(text)
    return load("nginx.conf", prefix=str(tmp_path))


def test_nested_locations_inherit_from_the_outer_one(tmp_path: Path) -> None:
    config = _load(tmp_path, "location /a/ { proxy_read_timeout 7s; proxy_set_header X-A 1;\n"
                             "  location /a/b/ { return 204; } }")
    locations = config.http.servers[0].locations
    outer = next(loc for loc in locations if loc.pattern == "/a/")
    inner = next(loc for loc in locations if loc.pattern == "/a/b/")
    assert outer.nested == (inner,)
    assert inner.proxy_read_timeout == 7.0
    assert [name for name, _ in inner.proxy_set_header] == ["X-A"]
    assert inner.return_ is not None and outer.return_ is None


@pytest.mark.parametrize(
    ("locations", "message", "line"),
    [
        ("location /a/ {\nlocation /b/ { } }", 'location "/b/" is outside location "/a/"', 6),
        ("location = /a {\nlocation /a { } }",
         'location "/a" cannot be inside the exact location "/a"', 6),
        ("location /a/ {\nlocation /a/b { }\nlocation /a/b { } }", 'duplicate location "/a/b"',
         7),
    ],
)
def test_nested_location_errors(tmp_path: Path, locations: str, message: str,
                                line: int) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, locations)
    assert str(info.value) == f"{message} in nginx.conf:{line}"
