"""Tokenizer for nginx's configuration syntax.

The grammar is nginx's (``ngx_conf_read_token``): words separated by white
space; ``;``, ``{`` and ``}`` are punctuation at the start of a token, while
inside a bare word only ``;`` and ``{`` end it (``a}b`` is one word); ``#``
starts a comment that runs to the end of the line; a word may be quoted with
``"`` or ``'`` and then keeps its white space and punctuation.  A backslash
protects the next character from ending the word; in the word's text ``\\"``,
``\\'`` and ``\\\\`` become the character, ``\\t``, ``\\r`` and ``\\n``
control characters, and any other ``\\x`` stays as written (regexes need
``\\d``), the same for quoted and bare words.  ``${`` inside a bare word opens
a variable name, so that brace is not punctuation.

Every token carries the file and line where it starts, so every later error can
point at the source.  There is no I/O here: :func:`tokenize` takes text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from forklb.config.errors import COMMAND_LINE, ConfigError

PUNCTUATION = frozenset(";{}")
_SPACE = " \t\r\n"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}
# What may follow a closing quote; ")" then starts a new word, as in nginx.
_AFTER_QUOTE = frozenset(_SPACE + ";{)")
_VAR_NAME = re.compile(r"[A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Token:
    """One word or punctuation mark of a config file."""

    text: str
    file: str
    line: int
    quoted: bool = False

    @property
    def is_punct(self) -> bool:
        return not self.quoted and self.text in PUNCTUATION


def unexpected_end(file: str, line: int | None) -> ConfigError:
    """nginx's error for text that ends inside a directive."""
    if file == COMMAND_LINE:
        return ConfigError('unexpected end of parameter, expecting ";"', file, line)
    return ConfigError('unexpected end of file, expecting ";" or "}"', file, line)


def tokenize(text: str, file: str) -> Iterator[Token]:
    """Yield the tokens of ``text``; ``file`` names it in tokens and errors."""
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in PUNCTUATION:
            yield Token(c, file, line)
            i += 1
        elif c in "\"'":
            start_line = line
            value, i, line = _read_quoted(text, i, line, file)
            if i < n and text[i] not in _AFTER_QUOTE:
                raise ConfigError(f'unexpected "{text[i]}"', file, line)
            yield Token(value, file, start_line, quoted=True)
        else:
            start_line = line
            value, i, line = _read_word(text, i, line, file)
            yield Token(value, file, start_line)


def _read_quoted(text: str, i: int, line: int, file: str) -> tuple[str, int, int]:
    """Read a quoted word starting at the quote ``text[i]``."""
    quote = text[i]
    start = i = i + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        if c == "\\":
            if i + 1 < n and text[i + 1] == "\n":
                line += 1
            i += 2
            continue
        if c == quote:
            return unescape(text[start:i]), i + 1, line
        i += 1
    raise unexpected_end(file, line)


def _read_word(text: str, i: int, line: int, file: str) -> tuple[str, int, int]:
    """Read a bare word: it ends at white space, ``;`` or a ``{`` not after ``$``."""
    start = i
    n = len(text)
    after_dollar = False
    while i < n:
        c = text[i]
        if c == "{" and after_dollar:
            i += 1
            continue
        after_dollar = c == "$"
        if c == "\\":
            if i + 1 < n and text[i + 1] == "\n":
                line += 1
            i = min(i + 2, n)
            continue
        if c in _SPACE or c in ";{":
            break
        i += 1
    word = unescape(text[start:i])
    _check_variable_brackets(word, file, line)
    return word, i, line


def unescape(raw: str) -> str:
    """nginx's copy loop: known ``\\x`` escapes are replaced, others kept."""
    if "\\" not in raw:
        return raw
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == "\\" and i + 1 < n and raw[i + 1] in _ESCAPES:
            out.append(_ESCAPES[raw[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _check_variable_brackets(word: str, file: str, line: int) -> None:
    """``${name}`` must close right after the name (ngx_http_script_compile)."""
    pos = word.find("${")
    while pos >= 0:
        name = _VAR_NAME.match(word, pos + 2).group()  # type: ignore[union-attr]
        end = pos + 2 + len(name)
        if end >= len(word) or word[end] != "}":
            raise ConfigError(f'the closing bracket in "{name}" variable is missing', file, line)
        pos = word.find("${", end + 1)
