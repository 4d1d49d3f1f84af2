"""Unit tests of forklb.http.routing: URI normalisation, location and server selection."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from forklb.http.routing import (
    BadHost,
    BadPath,
    LocationMatcher,
    VirtualHosts,
    normalize_path,
    split_host,
)

# -- normalize_path -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/a//b", "/a/b"),
        ("//a", "/a"),
        ("/a///b//", "/a/b/"),
        ("//", "/"),
        ("/a/./b", "/a/b"),
        ("/./a", "/a"),
        ("/a/.", "/a/"),
        ("/.", "/"),
        ("/./", "/"),
        ("/a/../b", "/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/b/../", "/a/"),
        ("/a/..", "/"),
        ("/a/b/c/../../d", "/a/d"),
        ("/a/./../b/./c/", "/b/c/"),
        ("/.hidden", "/.hidden"),
        ("/a/..b/c.", "/a/..b/c."),
        ("/a/...", "/a/..."),
    ],
)
def test_normalize_path(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a%20b", "/a b"),
        ("/%41%42c", "/ABc"),
        ("/a%2fb", "/a/b"),
        ("/%7Euser/", "/~user/"),
        ("/a%2e%2e/b", "/a../b"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E/b", "/a/b"),
        ("/caf%C3%A9", "/caf\u00e9"),
        ("/a+b", "/a+b"),
        ("/%25", "/%"),
    ],
)
def test_normalize_path_decodes_percent_escapes(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


def test_normalize_path_keeps_invalid_utf8_as_surrogates() -> None:
    assert normalize_path("/%ff") == "/\udcff"


def test_normalize_path_decodes_before_merging_slashes() -> None:
    assert normalize_path("/a%2F%2Fb") == "/a/b"


def test_unchanged_path_is_returned_as_is() -> None:
    path = "/static/app.js"
    assert normalize_path(path) is path


@pytest.mark.parametrize(
    "path",
    ["/..", "/../", "/../a", "/a/../..", "/a/../../b", "/./..", "//..", "/%2e%2e/x",
     "/a/%2E%2E/%2e%2e", "/%00", "/a%00b", "", "a/b", "%2Fa", "*"],
)
def test_normalize_path_rejects(path: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(path)


def test_bad_path_is_a_value_error() -> None:
    assert issubclass(BadPath, ValueError)


@pytest.mark.parametrize("path", ["/%zz", "/a%", "/a%4"])
def test_normalize_path_rejects_malformed_escapes(path: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(path)


# -- LocationMatcher ------------------------------------------------------------


@dataclass
class Loc:
    modifier: str
    pattern: str
    name: str = ""
    regex: re.Pattern[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.modifier in ("~", "~*") and self.regex is None:
            flags = re.IGNORECASE if self.modifier == "~*" else 0
            self.regex = re.compile(self.pattern, flags)
        self.name = self.name or f"{self.modifier}{self.pattern}"


def matcher(*locs: Loc) -> LocationMatcher[Loc]:
    return LocationMatcher(list(locs))


def match_name(m: LocationMatcher[Loc], uri: str) -> str | None:
    loc = m.match(uri)
    return None if loc is None else loc.name


def test_no_locations_match_nothing() -> None:
    assert matcher().match("/") is None


def test_prefix_location_matches_by_prefix() -> None:
    m = matcher(Loc("", "/api/"))
    assert (match_name(m, "/api/x"), match_name(m, "/api/"), match_name(m, "/ap")) == (
        "/api/", "/api/", None,
    )


def test_prefix_is_a_string_prefix_not_a_path_prefix() -> None:
    assert match_name(matcher(Loc("", "/api")), "/apiary") == "/api"


def test_longest_prefix_wins_whatever_the_order() -> None:
    locs = [Loc("", "/"), Loc("", "/a/b/"), Loc("", "/a/")]
    for order in (locs, locs[::-1]):
        m = LocationMatcher(order)
        assert [match_name(m, u) for u in ("/x", "/a/x", "/a/b/x")] == ["/", "/a/", "/a/b/"]


def test_remembered_matches_agree_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """match() remembers the location of the URIs it saw first, up to URIS_KEPT: the
    answers are _find's, asked again or not, and a scan of new URIs stores no more."""
    from forklb.http import routing

    monkeypatch.setattr(routing, "URIS_KEPT", 5)
    m = matcher(Loc("", "/"), Loc("^~", "/static/"), Loc("~", r"\.php$"), Loc("=", "/x"))
    uris = ["/x", "/static/a.php", "/a.php", "/b", "/x", "/c.php", "/static/", "/x", "/d"]
    for uri in uris * 2:
        assert m.match(uri) is m._find(uri)[0], uri
    assert list(m.seen) == ["/x", "/static/a.php", "/a.php", "/b", "/c.php"]
    assert matcher(Loc("", "/a")).match("/b") is None  # "no location" is remembered too


def test_exact_match_wins_over_everything() -> None:
    m = matcher(Loc("", "/"), Loc("^~", "/x"), Loc("~", "x$"), Loc("=", "/x"))
    assert match_name(m, "/x") == "=/x"


def test_exact_match_needs_the_whole_uri() -> None:
    m = matcher(Loc("=", "/x"), Loc("", "/"))
    assert (match_name(m, "/x/"), match_name(m, "/xy"), match_name(m, "/")) == ("/", "/", "/")


def test_exact_match_alone_does_not_match_as_prefix() -> None:
    assert matcher(Loc("=", "/x")).match("/x/y") is None


def test_first_exact_location_wins_for_the_same_uri() -> None:
    m = matcher(Loc("=", "/x", name="one"), Loc("=", "/x", name="two"))
    assert match_name(m, "/x") == "one"


def test_regex_wins_over_plain_prefix() -> None:
    m = matcher(Loc("", "/images/"), Loc("~", r"\.png$"))
    assert match_name(m, "/images/a.png") == r"~\.png$"


def test_regex_wins_even_over_a_prefix_equal_to_the_uri() -> None:
    m = matcher(Loc("", "/a.png"), Loc("~", r"\.png$"))
    assert match_name(m, "/a.png") == r"~\.png$"


def test_caret_tilde_prefix_skips_regexes() -> None:
    m = matcher(Loc("^~", "/images/"), Loc("~", r"\.png$"))
    assert match_name(m, "/images/a.png") == "^~/images/"
    assert match_name(m, "/other/a.png") == r"~\.png$"


def test_caret_tilde_only_applies_when_it_is_the_longest_prefix() -> None:
    m = matcher(Loc("^~", "/images/"), Loc("", "/images/big/"), Loc("~", r"\.png$"))
    assert match_name(m, "/images/big/a.png") == r"~\.png$"
    assert match_name(m, "/images/a.png") == "^~/images/"


def test_longer_caret_tilde_beats_shorter_plain_prefix() -> None:
    m = matcher(Loc("", "/"), Loc("^~", "/static/"), Loc("~", "css$"))
    assert match_name(m, "/static/a.css") == "^~/static/"


def test_regexes_are_tried_in_config_order_first_wins() -> None:
    m = matcher(Loc("~", r"\.php$", name="php"), Loc("~", r"^/admin", name="admin"))
    assert match_name(m, "/admin/index.php") == "php"
    m2 = matcher(Loc("~", r"^/admin", name="admin"), Loc("~", r"\.php$", name="php"))
    assert match_name(m2, "/admin/index.php") == "admin"


def test_regex_is_searched_not_anchored() -> None:
    assert match_name(matcher(Loc("~", "min")), "/admin/x") == "~min"


def test_case_sensitive_regex() -> None:
    m = matcher(Loc("~", r"\.PNG$"), Loc("", "/"))
    assert (match_name(m, "/a.PNG"), match_name(m, "/a.png")) == (r"~\.PNG$", "/")


def test_case_insensitive_regex() -> None:
    m = matcher(Loc("~*", r"\.png$"), Loc("", "/"))
    assert (match_name(m, "/a.PNG"), match_name(m, "/a.png")) == (r"~*\.png$", r"~*\.png$")


def test_no_regex_match_falls_back_to_longest_prefix() -> None:
    m = matcher(Loc("", "/"), Loc("", "/a/"), Loc("~", r"\.php$"))
    assert match_name(m, "/a/b.html") == "/a/"


def test_regex_only_config_without_match_gives_none() -> None:
    assert matcher(Loc("~", r"\.php$")).match("/a.html") is None


def test_empty_prefix_catches_everything_last() -> None:
    # The loader appends the server-level location as prefix "".
    m = matcher(Loc("", "/a"), Loc("", "", name="server"))
    assert (match_name(m, "/b"), match_name(m, "/a")) == ("server", "/a")


def test_regex_location_without_compiled_regex_is_skipped() -> None:
    m = matcher(Loc("~", "x", regex=None), Loc("", "/"))
    m.regexes[0].regex = None
    assert match_name(m, "/x") == "/"


def test_nginx_docs_example() -> None:
    # The example from nginx's "location" documentation.
    m = matcher(
        Loc("=", "/", name="A"),
        Loc("", "/", name="B"),
        Loc("", "/documents/", name="C"),
        Loc("^~", "/images/", name="D"),
        Loc("~*", r"\.(gif|jpg|jpeg)$", name="E"),
    )
    assert [match_name(m, u) for u in
            ("/", "/index.html", "/documents/document.html", "/images/1.gif",
             "/documents/1.jpg")] == ["A", "B", "C", "D", "E"]


# -- VirtualHosts ---------------------------------------------------------------


def vhosts(*servers: tuple[str, list[str], bool]) -> VirtualHosts[str]:
    return VirtualHosts(list(servers))


def test_empty_address_is_rejected() -> None:
    with pytest.raises(ValueError):
        VirtualHosts([])


def test_exact_name() -> None:
    v = vhosts(("a", ["a.test"], False), ("b", ["b.test", "www.b.test"], False))
    assert [v.select(h) for h in ("a.test", "b.test", "www.b.test")] == ["a", "b", "b"]


def test_unknown_name_goes_to_the_first_server() -> None:
    v = vhosts(("a", ["a.test"], False), ("b", ["b.test"], False))
    assert v.select("c.test") == "a"


def test_unknown_name_goes_to_default_server() -> None:
    v = vhosts(("a", ["a.test"], False), ("b", ["b.test"], True), ("c", ["c.test"], False))
    assert v.select("zzz") == "b"


def test_default_server_still_loses_to_a_name_match() -> None:
    v = vhosts(("a", ["a.test"], False), ("b", ["b.test"], True))
    assert v.select("a.test") == "a"


def test_server_names_are_matched_case_insensitively() -> None:
    v = vhosts(("a", ["Example.COM"], False), ("b", ["other"], True))
    assert v.select("example.com") == "a"


def test_first_server_with_a_duplicate_name_wins() -> None:
    v = vhosts(("a", ["dup.test"], False), ("b", ["dup.test"], True))
    assert v.select("dup.test") == "a"


def test_leading_star_wildcard() -> None:
    v = vhosts(("d", ["default"], True), ("w", ["*.example.org"], False))
    assert [v.select(h) for h in ("www.example.org", "a.b.example.org", "example.org",
                                  "xexample.org")] == ["w", "w", "d", "d"]


def test_leading_dot_matches_the_name_and_its_subdomains() -> None:
    v = vhosts(("d", ["default"], True), ("w", [".example.org"], False))
    assert [v.select(h) for h in ("example.org", "www.example.org", "a.b.example.org",
                                  "xexample.org")] == ["w", "w", "w", "d"]


def test_longest_leading_wildcard_wins() -> None:
    for order in (1, -1):
        servers = [("short", ["*.example.org"], False), ("long", ["*.www.example.org"], False)]
        v = VirtualHosts(servers[::order])
        assert v.select("a.www.example.org") == "long"
        assert v.select("a.api.example.org") == "short"


def test_trailing_wildcard() -> None:
    v = vhosts(("d", ["default"], True), ("t", ["www.example.*"], False))
    assert [v.select(h) for h in ("www.example.com", "www.example.co.uk", "www.examples.com",
                                  "api.example.com")] == ["t", "t", "d", "d"]


def test_longest_trailing_wildcard_wins() -> None:
    v = vhosts(("short", ["www.*"], False), ("long", ["www.example.*"], False))
    assert (v.select("www.example.net"), v.select("www.other.net")) == ("long", "short")


def test_exact_beats_wildcards() -> None:
    v = vhosts(("w", ["*.example.org"], False), ("t", ["www.example.*"], False),
               ("e", ["www.example.org"], False))
    assert v.select("www.example.org") == "e"


def test_leading_wildcard_beats_trailing_wildcard() -> None:
    v = vhosts(("t", ["www.example.*"], False), ("w", ["*.example.org"], False))
    assert v.select("www.example.org") == "w"


def test_wildcards_beat_regexes() -> None:
    v = vhosts(("r", ["~^www\\."], False), ("t", ["www.example.*"], False))
    assert v.select("www.example.org") == "t"


def test_regex_names_in_config_order_first_wins() -> None:
    v = vhosts(("d", ["default"], True), ("one", ["~^api\\d+\\."], False),
               ("two", ["~\\.test$"], False))
    assert [v.select(h) for h in ("api1.test", "x.test", "api.org")] == ["one", "two", "d"]


def test_regex_names_are_case_insensitive() -> None:
    v = vhosts(("d", ["default"], True), ("r", ["~^WWW\\.example\\.org$"], False))
    assert v.select("www.example.org") == "r"


def test_regex_name_escapes_are_not_lower_cased() -> None:
    v = vhosts(("d", ["default"], True), ("r", ["~^\\S+\\.example\\.com$"], False))
    assert v.select("www.example.com") == "r"


def test_empty_host_matches_server_with_empty_name() -> None:
    # server_name "" (the default) catches requests without a Host header.
    v = vhosts(("a", ["a.test"], True), ("b", [""], False))
    assert v.select("") == "b"


def test_empty_host_without_empty_name_goes_to_default() -> None:
    v = vhosts(("a", ["a.test"], False), ("b", ["*.test"], True), ("c", ["~.*"], False))
    assert v.select("") == "b"


def test_one_server_with_many_kinds_of_names() -> None:
    v = vhosts(("d", ["default"], True),
               ("m", ["example.org", "*.example.net", "www.example.*", "~^api-"], False))
    assert [v.select(h) for h in ("example.org", "a.example.net", "www.example.io",
                                  "api-1.com", "nope.com")] == ["m", "m", "m", "m", "d"]


# -- split_host -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com.", "example.com"),
        ("EXAMPLE.com.:80", "example.com"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("[FE80::1]:80", "[fe80::1]"),
        ("[::1", "[::1"),
    ],
)
def test_split_host(value: str, expected: str) -> None:
    assert split_host(value) == expected


@pytest.mark.parametrize("value", ["", ".", ":80", "a..b", "a/b", "a b", "a\tb", "a\x7fb"])
def test_split_host_refuses_what_nginx_refuses(value: str) -> None:
    with pytest.raises(BadHost):
        split_host(value)
