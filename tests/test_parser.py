"""Unit tests of forklb.config.parser: directive trees, include, syntax errors.

Line numbers of the syntax errors were checked by hand against ``nginx -t`` (1.22).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forklb.config.errors import ConfigError
from forklb.config.parser import MAX_INCLUDE_DEPTH, Directive, Parser


def parse(text: str, conf_dir: str = "/nonexistent") -> list[Directive]:
    return Parser(conf_dir).parse_text(text, "main.conf")


def parse_error(text: str, conf_dir: str = "/nonexistent") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, conf_dir)
    return info.value


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(directives) -> list[str]:
    return [d.name for d in directives]


# -- tree shape ---------------------------------------------------------------


def test_empty_text_gives_no_directives() -> None:
    assert parse("") == []


def test_simple_directive() -> None:
    (d,) = parse("worker_processes 4;")
    assert (d.name, d.values, d.children) == ("worker_processes", ("4",), None)


def test_directive_without_arguments() -> None:
    (d,) = parse("accept_mutex;")
    assert d.values == () and d.args == ()


def test_directive_file_and_line() -> None:
    (_a, b) = parse("a;\n\nb;")
    assert (b.file, b.line) == ("main.conf", 3)
    assert b.where() == ("main.conf", 3)


def test_args_are_tokens_with_quoting() -> None:
    (d,) = parse('log_format main "$a b" c;')
    assert d.values == ("main", "$a b", "c")
    assert [t.quoted for t in d.args] == [False, True, False]


def test_quoted_punctuation_is_an_argument() -> None:
    (d,) = parse('x ";" "{" "}";')
    assert d.values == (";", "{", "}")


def test_block_directive_has_children() -> None:
    (d,) = parse("events { worker_connections 10; }")
    assert d.name == "events" and d.values == ()
    assert d.children is not None
    assert [(c.name, c.values) for c in d.children] == [("worker_connections", ("10",))]


def test_empty_block_has_empty_children_not_none() -> None:
    (d,) = parse("events {}")
    assert d.children == ()


def test_block_with_arguments() -> None:
    (d,) = parse("location ~* \\.png$ { }")
    assert d.values == ("~*", "\\.png$") and d.children == ()


def test_nested_blocks() -> None:
    (http,) = parse("http { server { location / { root x; } } upstream u { server a; } }")
    assert names(http.children) == ["server", "upstream"]
    server = http.children[0]
    (location,) = server.children
    assert (location.name, location.values) == ("location", ("/",))
    assert [(c.name, c.values) for c in location.children] == [("root", ("x",))]
    assert http.children[1].children[0].values == ("a",)


def test_sibling_order_is_kept() -> None:
    (http,) = parse("http { a 1; b { } c 3; a 4; }")
    assert [(c.name, c.values) for c in http.children] == [
        ("a", ("1",)), ("b", ()), ("c", ("3",)), ("a", ("4",)),
    ]


def test_directives_after_a_block_are_at_top_level() -> None:
    assert names(parse("events { } http { } pid x;")) == ["events", "http", "pid"]


def test_block_line_is_its_name_line() -> None:
    (http,) = parse("\n\nhttp {\n  server {\n  }\n}\n")
    assert http.line == 3 and http.children[0].line == 4


def test_directive_line_is_the_line_of_its_terminator() -> None:
    # nginx reports a directive where its ";" or "{" is.
    (events, pid) = parse("events\n\n{\n}\npid\n  x\n  ;\n")
    assert (events.line, pid.line) == (3, 7)


def test_block_end_line_is_its_closing_brace() -> None:
    (http,) = parse("http {\n  a;\n\n}\n")
    assert (http.line, http.end_line, http.children[0].end_line) == (1, 4, 2)


def test_comments_are_ignored() -> None:
    (d,) = parse("# top\nevents { # inside\n  x 1; # after\n}\n")
    assert [c.name for c in d.children] == ["x"]


def test_directive_is_hashable_and_frozen() -> None:
    (d,) = parse("a b;")
    with pytest.raises(AttributeError):
        d.name = "c"  # type: ignore[misc]
    assert hash(d) == hash(parse("a b;")[0])


# -- syntax errors (messages and lines as nginx -t prints them) ----------------


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("events {}\n}\n", 'unexpected "}"', 2),
        ("}", 'unexpected "}"', 1),
        ("events {}\ndaemon off; ;\n", 'unexpected ";"', 2),
        (";", 'unexpected ";"', 1),
        ("events {} {\n", 'unexpected "{"', 1),
        ("{ }", 'unexpected "{"', 1),
        ("http { server { location / } }", 'unexpected "}"', 1),
        ("events {\n  worker_connections 10\n}\n", 'unexpected "}"', 3),
        ('events {}\n"a"}\n', 'unexpected "}"', 2),
    ],
)
def test_unexpected_punctuation(text: str, message: str, line: int) -> None:
    err = parse_error(text)
    assert (err.message, err.file, err.line) == (message, "main.conf", line)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("events {}\nhttp {\n  server {\n", 4),  # nginx -t: c2.conf:4
        ("events {}\nhttp {\n  server {\n  }", 4),  # no final newline: still line 4
        ("http {", 1),
        ("http {\n\n\n", 4),
        ("http { server { } ", 1),
    ],
)
def test_unexpected_end_of_file_expecting_brace(text: str, line: int) -> None:
    err = parse_error(text)
    assert (err.message, err.file, err.line) == (
        'unexpected end of file, expecting "}"', "main.conf", line,
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("events {}\nworker_processes 2\n", 3),  # nginx -t: line 3
        ("events {}\nworker_processes 2", 2),  # nginx -t: line 2
        ("daemon", 1),
        ("http { server { listen 80", 1),
        ("a;\nb\n\n", 4),
    ],
)
def test_unexpected_end_of_file_expecting_semicolon(text: str, line: int) -> None:
    err = parse_error(text)
    assert (err.message, err.file, err.line) == (
        'unexpected end of file, expecting ";" or "}"', "main.conf", line,
    )


def test_lexer_errors_pass_through() -> None:
    err = parse_error('a "b')
    assert err.message.startswith("unexpected end of file") and err.file == "main.conf"


def test_str_of_error_has_file_and_line() -> None:
    assert str(parse_error("a;\n}")) == 'unexpected "}" in main.conf:2'


# -- parse_file -----------------------------------------------------------------


def test_parse_file_reads_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.conf", "events {}\npid x;\n")
    parser = Parser(str(tmp_path))
    tree = parser.parse_file(str(path))
    assert names(tree) == ["events", "pid"]
    assert tree[1].file == str(path)
    assert parser.files == [str(path)]


def test_parse_file_display_name_is_used_in_directives_and_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "a.conf", "pid x;\n}\n")
    with pytest.raises(ConfigError) as info:
        Parser(str(tmp_path)).parse_file(str(path), display="shown.conf")
    assert (info.value.file, info.value.line) == ("shown.conf", 2)
    ok = write(tmp_path / "b.conf", "pid x;")
    assert Parser(str(tmp_path)).parse_file(str(ok), display="b")[0].file == "b"


def test_parse_file_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        Parser(str(tmp_path)).parse_file(missing)
    assert str(info.value) == f'open() "{missing}" failed (2: No such file or directory)'
    assert info.value.file is None


def test_parse_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.conf"
    path.write_bytes(b"pid \xff\xfe;\n")
    with pytest.raises(ConfigError) as info:
        Parser(str(tmp_path)).parse_file(str(path))
    assert "UTF-8" in info.value.message


# -- include ------------------------------------------------------------------


def test_include_splices_directives_in_place(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "b 1;\nc 2;\n")
    main = write(tmp_path / "main.conf", "a;\ninclude inc.conf;\nd;\n")
    tree = Parser(str(tmp_path)).parse_file(str(main))
    assert names(tree) == ["a", "b", "c", "d"]


def test_include_directive_itself_is_not_in_the_tree(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "")
    main = write(tmp_path / "main.conf", "include inc.conf;\n")
    assert Parser(str(tmp_path)).parse_file(str(main)) == []


def test_include_inside_a_block(tmp_path: Path) -> None:
    write(tmp_path / "servers" / "one.conf", "server { listen 1; }\n")
    main = write(tmp_path / "main.conf", "http {\n  include servers/one.conf;\n}\n")
    (http,) = Parser(str(tmp_path)).parse_file(str(main))
    (server,) = http.children
    assert server.name == "server" and server.children[0].values == ("1",)


def test_included_directives_name_their_own_file_and_line(tmp_path: Path) -> None:
    inc = write(tmp_path / "inc.conf", "\n\nb;\n")
    main = write(tmp_path / "main.conf", "include inc.conf;\n")
    (b,) = Parser(str(tmp_path)).parse_file(str(main))
    assert (b.file, b.line) == (str(inc), 3)


def test_include_is_relative_to_the_conf_dir_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    write(conf / "inc.conf", "from_conf_dir;\n")
    write(tmp_path / "inc.conf", "from_cwd;\n")
    main = write(conf / "main.conf", "include inc.conf;\n")
    monkeypatch.chdir(tmp_path)
    assert names(Parser(str(conf)).parse_file(str(main))) == ["from_conf_dir"]


def test_nested_include_is_relative_to_the_main_conf_dir(tmp_path: Path) -> None:
    # nginx resolves every relative include against the conf prefix, not the
    # directory of the including file.
    write(tmp_path / "sub" / "a.conf", "include b.conf;\n")
    write(tmp_path / "b.conf", "top_b;\n")
    write(tmp_path / "sub" / "b.conf", "sub_b;\n")
    main = write(tmp_path / "main.conf", "include sub/a.conf;\n")
    assert names(Parser(str(tmp_path)).parse_file(str(main))) == ["top_b"]


def test_include_absolute_path(tmp_path: Path) -> None:
    inc = write(tmp_path / "elsewhere" / "x.conf", "abs;\n")
    main = write(tmp_path / "conf" / "main.conf", f"include {inc};\n")
    assert names(Parser(str(tmp_path / "conf")).parse_file(str(main))) == ["abs"]


def test_include_quoted_pattern(tmp_path: Path) -> None:
    write(tmp_path / "my file.conf", "spaced;\n")
    main = write(tmp_path / "main.conf", 'include "my file.conf";\n')
    assert names(Parser(str(tmp_path)).parse_file(str(main))) == ["spaced"]


def test_include_glob_expands_in_sorted_order(tmp_path: Path) -> None:
    for name in ["b.conf", "c.conf", "a.conf", "10.conf", "2.conf"]:
        write(tmp_path / "d" / name, f"f_{name.split('.')[0]};\n")
    write(tmp_path / "d" / "skip.txt", "not_included;\n")
    main = write(tmp_path / "main.conf", "include d/*.conf;\n")
    assert names(Parser(str(tmp_path)).parse_file(str(main))) == [
        "f_10", "f_2", "f_a", "f_b", "f_c",
    ]


def test_include_glob_skips_hidden_files(tmp_path: Path) -> None:
    write(tmp_path / "d" / ".hidden.conf", "hidden;\n")
    write(tmp_path / "d" / "x.conf", "shown;\n")
    main = write(tmp_path / "main.conf", "include d/*.conf;\n")
    assert names(Parser(str(tmp_path)).parse_file(str(main))) == ["shown"]


def test_include_glob_matching_nothing_is_fine(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "a;\ninclude nothing/*.conf;\nb;\n")
    assert names(Parser(str(tmp_path)).parse_file(str(main))) == ["a", "b"]


def test_include_records_every_file_read_main_first(tmp_path: Path) -> None:
    a = write(tmp_path / "d" / "a.conf", "")
    b = write(tmp_path / "d" / "b.conf", "")
    main = write(tmp_path / "main.conf", "include d/*.conf;\n")
    parser = Parser(str(tmp_path))
    parser.parse_file(str(main))
    assert parser.files == [str(main), str(a), str(b)]


def test_include_missing_file_error(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "events {}\nhttp { include missing.conf; }\n")
    with pytest.raises(ConfigError) as info:
        Parser(str(tmp_path)).parse_file(str(main), display="main.conf")
    # nginx -t: open() "/.../missing.conf" failed (2: No such file or directory) in F:2
    expected = os.path.join(str(tmp_path), "missing.conf")
    assert str(info.value) == (
        f'open() "{expected}" failed (2: No such file or directory) in main.conf:2'
    )


def test_error_in_included_file_names_that_file(tmp_path: Path) -> None:
    inc = write(tmp_path / "inc" / "bad.conf", "server {\n  listen 80;\n  }\n}\n")
    main = write(tmp_path / "main.conf", "http { include inc/*.conf; }\n")
    with pytest.raises(ConfigError) as info:
        Parser(str(tmp_path)).parse_file(str(main))
    assert (info.value.message, info.value.file, info.value.line) == (
        'unexpected "}"', str(inc), 4,
    )


def test_unclosed_block_in_included_file_is_reported_there(tmp_path: Path) -> None:
    inc = write(tmp_path / "inc.conf", "server {\n")
    main = write(tmp_path / "main.conf", "http {\ninclude inc.conf;\n}\n")
    with pytest.raises(ConfigError) as info:
        Parser(str(tmp_path)).parse_file(str(main))
    assert (info.value.message, info.value.file, info.value.line) == (
        'unexpected end of file, expecting "}"', str(inc), 2,
    )


def test_missing_file_in_nested_include_names_the_including_file(tmp_path: Path) -> None:
    inc = write(tmp_path / "inc.conf", "\ninclude gone.conf;\n")
    main = write(tmp_path / "main.conf", "include inc.conf;\n")
    with pytest.raises(ConfigError) as info:
        Parser(str(tmp_path)).parse_file(str(main))
    assert (info.value.file, info.value.line) == (str(inc), 2)
    assert "gone.conf" in info.value.message


@pytest.mark.parametrize("args", ["", " a.conf b.conf"])
def test_include_needs_exactly_one_argument(tmp_path: Path, args: str) -> None:
    err = parse_error(f"\ninclude{args};", str(tmp_path))
    assert (err.message, err.line) == ('invalid number of arguments in "include" directive', 2)


def test_self_include_stops_at_the_depth_limit(tmp_path: Path) -> None:
    main = write(tmp_path / "loop.conf", "include loop.conf;\n")
    parser = Parser(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        parser.parse_file(str(main))
    assert info.value.message == "include nesting is too deep"
    assert len(parser.files) == MAX_INCLUDE_DEPTH + 1


def test_include_as_block_is_not_expanded() -> None:
    # "include x { }" is left for the directive check to reject.
    (d,) = parse("include x { }")
    assert d.name == "include" and d.children == ()


def test_parse_text_include_uses_conf_dir(tmp_path: Path) -> None:
    write(tmp_path / "x.conf", "from_x;\n")
    assert names(Parser(str(tmp_path)).parse_text("include x.conf;", "command line")) == [
        "from_x",
    ]
