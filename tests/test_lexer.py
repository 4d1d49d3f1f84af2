"""Unit tests of forklb.config.lexer: nginx's ngx_conf_read_token, on text."""

from __future__ import annotations

import pytest

from forklb.config.errors import ConfigError
from forklb.config.lexer import Token, tokenize


def texts(text: str) -> list[str]:
    return [t.text for t in tokenize(text, "f.conf")]


def toks(text: str) -> list[Token]:
    return list(tokenize(text, "f.conf"))


def lex_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        list(tokenize(text, "f.conf"))
    return info.value


# -- words and punctuation ----------------------------------------------------


def test_empty_text_has_no_tokens() -> None:
    assert toks("") == []


def test_only_whitespace_and_comments_has_no_tokens() -> None:
    assert toks("  \t\r\n# a comment\n   # another\n") == []


def test_simple_directive() -> None:
    assert texts("worker_processes 4;") == ["worker_processes", "4", ";"]


def test_punctuation_needs_no_spaces() -> None:
    assert texts("events{worker_connections 10;}") == [
        "events", "{", "worker_connections", "10", ";", "}",
    ]


def test_semicolon_ends_a_bare_word() -> None:
    assert texts("a b;c") == ["a", "b", ";", "c"]


def test_open_brace_ends_a_bare_word() -> None:
    assert texts("server{") == ["server", "{"]


@pytest.mark.parametrize("sep", [" ", "\t", "\r", "\n", "\r\n", "  \t "])
def test_whitespace_separates_words(sep: str) -> None:
    assert texts(f"a{sep}b") == ["a", "b"]


def test_token_carries_file_name() -> None:
    assert {t.file for t in tokenize("a b;", "/etc/x.conf")} == {"/etc/x.conf"}


def test_bare_word_is_not_quoted() -> None:
    assert [t.quoted for t in toks("a;")] == [False, False]


@pytest.mark.parametrize("text", [";", "{", "}"])
def test_bare_punctuation_is_punct(text: str) -> None:
    (tok,) = toks(text)
    assert tok.is_punct


def test_word_is_not_punct() -> None:
    (tok,) = toks("word")
    assert not tok.is_punct


def test_token_is_frozen() -> None:
    (tok,) = toks("word")
    with pytest.raises(AttributeError):
        tok.text = "other"  # type: ignore[misc]


# -- comments -----------------------------------------------------------------


def test_comment_runs_to_end_of_line() -> None:
    assert texts("a; # b c ; {\nd;") == ["a", ";", "d", ";"]


def test_comment_at_end_of_text_without_newline() -> None:
    assert texts("a; # trailing") == ["a", ";"]


def test_comment_right_after_semicolon() -> None:
    assert texts("a;#x\nb;") == ["a", ";", "b", ";"]


def test_hash_inside_bare_word_is_literal() -> None:
    # nginx: '#' only starts a comment at the start of a token.
    assert texts("a#b;") == ["a#b", ";"]


def test_hash_inside_quotes_is_literal() -> None:
    assert texts('"a # b";') == ["a # b", ";"]


def test_comment_line_still_counts_lines() -> None:
    d = [t for t in toks("# one\n# two\nd;") if t.text == "d"][0]
    assert d.line == 3


# -- quotes -------------------------------------------------------------------


@pytest.mark.parametrize("quote", ['"', "'"])
def test_quoted_word_keeps_spaces_and_punctuation(quote: str) -> None:
    (tok, semi) = toks(f"{quote}a b; {{c}} # d{quote};")
    assert (tok.text, tok.quoted) == ("a b; {c} # d", True)
    assert semi.text == ";"


@pytest.mark.parametrize("text", ['";"', "'{'", '"}"'])
def test_quoted_punctuation_is_not_punct(text: str) -> None:
    (tok,) = toks(text)
    assert tok.quoted and not tok.is_punct
    assert tok.text == text[1]


def test_empty_quoted_word() -> None:
    (tok, _semi) = toks('"";')
    assert (tok.text, tok.quoted) == ("", True)


def test_single_quote_inside_double_quotes_is_literal() -> None:
    assert texts("\"it's\";") == ["it's", ";"]


def test_double_quote_inside_single_quotes_is_literal() -> None:
    assert texts("'say \"hi\"';") == ['say "hi"', ";"]


@pytest.mark.parametrize("after", [";", " ", "\t", "\n", "{"])
def test_closing_quote_may_be_followed_by_separator(after: str) -> None:
    assert texts(f'"a"{after}')[0] == "a"


def test_closing_quote_followed_by_closing_brace_is_an_error() -> None:
    # nginx -t on 'daemon "off"}': unexpected "}"
    assert lex_error('"a"}').message == 'unexpected "}"'


def test_closing_paren_after_quote_starts_a_word() -> None:
    # ngx_conf_read_token lets ")" follow a closing quote (for "if (...)").
    assert texts('"a") b;') == ["a", ")", "b", ";"]


def test_closing_quote_followed_by_letter_is_an_error() -> None:
    # nginx: unexpected "b" in f.conf:1
    err = lex_error('"a"b;')
    assert (err.message, err.file, err.line) == ('unexpected "b"', "f.conf", 1)


def test_quote_inside_bare_word_is_literal() -> None:
    assert texts("a\"b'c;") == ["a\"b'c", ";"]


def test_multiline_quoted_word_keeps_newlines() -> None:
    (tok, _semi) = toks('"a\nb";')
    assert tok.text == "a\nb"


def test_multiline_quoted_word_starts_at_its_first_line() -> None:
    tokens = toks('x "a\nb\nc" y;')
    assert [(t.text, t.line) for t in tokens] == [
        ("x", 1), ("a\nb\nc", 1), ("y", 3), (";", 3),
    ]


# -- escapes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "value"),
    [
        (r'"a\"b"', 'a"b'),
        (r"'a\'b'", "a'b"),
        (r'"a\\b"', "a\\b"),
        (r'"a\nb"', "a\nb"),
        (r'"a\tb"', "a\tb"),
        (r'"a\rb"', "a\rb"),
        (r'"\d+\.php$"', r"\d+\.php$"),  # unknown escapes stay verbatim (regexes)
        (r'"a\qb"', r"a\qb"),
        (r'"\\\""', '\\"'),
    ],
)
def test_escapes_in_quoted_words(source: str, value: str) -> None:
    assert texts(source + ";") == [value, ";"]


def test_escaped_quote_does_not_end_the_word() -> None:
    assert texts(r'"a\" b" c;') == ['a" b', "c", ";"]


def test_escaped_backslash_before_closing_quote() -> None:
    assert texts(r'"a\\" b;') == ["a\\", "b", ";"]


@pytest.mark.parametrize(("source", "value"), [(r"'a\"b'", 'a"b'), (r'"a\'b"', "a'b")])
def test_escaped_other_quote_inside_quotes(source: str, value: str) -> None:
    assert texts(source + ";") == [value, ";"]


@pytest.mark.parametrize(
    ("source", "value"),
    [
        (r"a\"b", 'a"b'),
        (r"a\'b", "a'b"),
        (r"a\\b", "a\\b"),
        (r"\d+", r"\d+"),
    ],
)
def test_escapes_in_bare_words(source: str, value: str) -> None:
    assert texts(source + ";") == [value, ";"]


def test_backslash_keeps_a_semicolon_inside_a_bare_word() -> None:
    tokens = texts(r"a\;b c;")
    assert len(tokens) == 3 and tokens[1:] == ["c", ";"]


@pytest.mark.parametrize(
    ("source", "value"), [(r"a\;b", r"a\;b"), (r"a\ b", r"a\ b"), (r"a\tb", "a\tb")]
)
def test_bare_word_escapes_like_nginx(source: str, value: str) -> None:
    assert texts(source + ";") == [value, ";"]


def test_backslash_at_end_of_text_is_kept() -> None:
    assert texts("a\\") == ["a\\"]


# -- ${var} braces ------------------------------------------------------------


def test_variable_braces_are_not_punctuation() -> None:
    assert texts("proxy_set_header X ${host}x;") == ["proxy_set_header", "X", "${host}x", ";"]


def test_variable_braces_in_the_middle_of_a_word() -> None:
    assert texts("a${b}c${d};") == ["a${b}c${d}", ";"]


def test_plain_dollar_variable_is_an_ordinary_word() -> None:
    assert texts("$host:$server_port;") == ["$host:$server_port", ";"]


def test_brace_without_dollar_opens_a_block() -> None:
    # "}" ends nothing inside a word (nginx -t on 'http {\nb}\n': unexpected end of file)
    assert texts("a{b }") == ["a", "{", "b", "}"]
    assert texts("a{b}") == ["a", "{", "b}"]


def test_closing_brace_after_variable_ends_the_block() -> None:
    assert texts("{x ${a};}") == ["{", "x", "${a}", ";", "}"]


@pytest.mark.parametrize(
    "text",
    ["x ${host;", "x ${host", "x ${ho st};", "x ${host\n};", "x ${a{b};", "x ${ho-st};"],
)
def test_missing_closing_bracket_of_variable(text: str) -> None:
    err = lex_error(text)
    assert "closing bracket" in err.message and "missing" in err.message
    assert (err.file, err.line) == ("f.conf", 1)


def test_missing_closing_bracket_reports_its_line() -> None:
    err = lex_error("a;\nb;\nx ${host;")
    assert err.line == 3


def test_missing_closing_bracket_names_the_variable() -> None:
    assert lex_error("x ${host;").message == 'the closing bracket in "host" variable is missing'


# -- line numbers -------------------------------------------------------------


def test_line_numbers_on_multiline_input() -> None:
    text = "events {\n    worker_connections 10;\n}\n\nhttp {\n}\n"
    assert [(t.text, t.line) for t in toks(text)] == [
        ("events", 1), ("{", 1), ("worker_connections", 2), ("10", 2), (";", 2), ("}", 3),
        ("http", 5), ("{", 5), ("}", 6),
    ]


def test_crlf_line_endings_count_once() -> None:
    assert [t.line for t in toks("a;\r\nb;\r\nc;")] == [1, 1, 2, 2, 3, 3]


def test_words_of_a_directive_spread_over_lines() -> None:
    assert [(t.text, t.line) for t in toks("listen\n  80\n  ;")] == [
        ("listen", 1), ("80", 2), (";", 3),
    ]


def test_escaped_newline_in_quotes_counts_a_line() -> None:
    tokens = toks('"a\\\nb" c;')
    assert [(t.text, t.line) for t in tokens][1:] == [("c", 2), (";", 2)]


def test_escaped_newline_in_bare_word_counts_a_line() -> None:
    d = [t for t in toks("a\\\nb;\nd;") if t.text == "d"][0]
    assert d.line == 3


# -- unterminated quotes ------------------------------------------------------


@pytest.mark.parametrize("text", ['"abc', "'abc", 'a "b;\n', '"a\\"'])
def test_unterminated_quote_is_an_error(text: str) -> None:
    err = lex_error(text)
    assert err.message.startswith("unexpected end of file")
    assert err.file == "f.conf"


def test_unterminated_quote_reports_the_last_line() -> None:
    # nginx reports the line the end of file is on (here 4: three newlines read).
    err = lex_error('events {}\ndaemon "off\n;\n')
    assert err.line == 4


def test_unterminated_quote_message_matches_nginx() -> None:
    assert lex_error('daemon "off').message == 'unexpected end of file, expecting ";" or "}"'


# -- where nginx's grammar differs from a naive one ---------------------------


def test_closing_brace_inside_bare_word_is_literal() -> None:
    assert texts("a}b;") == ["a}b", ";"]


def test_tokenize_is_lazy() -> None:
    # The error comes from a later token, so the first one is produced first.
    gen = tokenize('ok "unterminated', "f.conf")
    assert next(gen).text == "ok"
    with pytest.raises(ConfigError):
        next(gen)
