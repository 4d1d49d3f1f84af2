"""Regex captures as variables ($1..$9, named), PCRE named-group syntax (unit level).

tests/test_diff_nginx.py checks the same against nginx 1.22 end to end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from forklb.config import ConfigError
from forklb.config.loader import load
from forklb.http.routing import pcre_pattern, server_name_match
from forklb.http.variables import UnknownVariable, compile_template


@pytest.mark.parametrize(
    ("pcre", "python"),
    [
        (r"^(?<sub>.+)\.x$", r"^(?P<sub>.+)\.x$"),
        (r"(?'a'x)", r"(?P<a>x)"),
        (r"(?P<a>x)", r"(?P<a>x)"),
        (r"(?<=a)(?<!b)", r"(?<=a)(?<!b)"),  # look-behinds stay
        (r"\(?<a>", r"\(?<a>"),  # an escaped parenthesis is no group
    ],
)
def test_pcre_pattern(pcre: str, python: str) -> None:
    assert pcre_pattern(pcre) == python


def test_server_name_match_only_when_no_plain_name_matches() -> None:
    names = ("*.a.test", r"~^(?<w>\w+)\.a\.test$", r"~^(\w+)\.b\.test$")
    assert server_name_match(names, "x.a.test") is None  # the wildcard chose the server
    m = server_name_match(names, "y.b.test")
    assert m is not None and m.group(1) == "y"
    assert server_name_match(names, "") is None


@dataclass
class Loc:
    regex: re.Pattern[str] | None


@dataclass
class Srv:
    names: tuple[str, ...]


@dataclass
class Req:
    location: Loc | None
    server: Srv | None
    uri: str
    host: str


def _render(text: str, req: Req, captures: frozenset[str] = frozenset()) -> str:
    return compile_template(text, captures).render(req)


def test_location_captures_then_server_captures() -> None:
    server = Srv((r"~^(?<sub>[a-z]+)\.(x)\.test$",))
    regex_loc = Loc(re.compile(r"^/c/(?P<first>[^/]+)/(.*)$"))
    names = frozenset({"sub", "first"})
    on_regex = Req(regex_loc, server, "/c/one/two", "abc.x.test")
    on_prefix = Req(Loc(None), server, "/c/one/two", "abc.x.test")
    text = "$1|$2|$3|$first|$sub|$1z"
    assert _render(text, on_regex, names) == "one|two||one|abc|onez"
    assert _render(text, on_prefix, names) == "abc|x|||abc|abcz"


def test_braced_digit_is_no_capture() -> None:
    with pytest.raises(UnknownVariable) as info:
        compile_template("${1}")
    assert info.value.name == "1"


def test_named_captures_are_variables_only_when_a_regex_defines_them(tmp_path: Path) -> None:
    def conf(extra: str) -> str:
        return ("events {}\nhttp {\nserver {\nlisten 127.0.0.1:8080;\n"
                r"server_name ~^(?<sub>.+)\.x\.test$;" "\n"
                f"location / {{ proxy_pass http://127.0.0.1:9; {extra} }}\n}}\n}}\n")

    (tmp_path / "nginx.conf").write_text(conf("proxy_set_header X-Sub $sub;"))
    load("nginx.conf", prefix=str(tmp_path))
    (tmp_path / "nginx.conf").write_text(conf("proxy_set_header X-Sub $other;"))
    with pytest.raises(ConfigError) as info:
        load("nginx.conf", prefix=str(tmp_path))
    assert str(info.value) == 'unknown "other" variable in nginx.conf:6'
