"""Tokenizer for nginx's configuration syntax.

The grammar is nginx's (``ngx_conf_read_token``): words separated by white
space; ``;``, ``{`` and ``}`` are punctuation; ``#`` starts a comment that runs
to the end of the line; a word may be quoted with ``"`` or ``'`` and then keeps
its white space and punctuation; a backslash escapes the next character
(``\\n``, ``\\t``, ``\\r`` become control characters inside quotes).  ``${name}``
inside a word is a variable, so its braces are not punctuation.

Every token carries the file and line where it starts, so every later error can
point at the source.  There is no I/O here: :func:`tokenize` takes text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from forklb.config.errors import ConfigError

PUNCTUATION = frozenset(";{}")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


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
            if i < n and text[i] not in " \t\r\n;{}":
                raise ConfigError(f'unexpected "{text[i]}"', file, line)
            yield Token(value, file, start_line, quoted=True)
        else:
            start_line = line
            value, i, line = _read_word(text, i, line, file)
            yield Token(value, file, start_line)


def _read_quoted(text: str, i: int, line: int, file: str) -> tuple[str, int, int]:
    quote = text[i]
    i += 1
    out: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == quote or nxt == "\\":
                out.append(nxt)
            elif nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
            else:
                # nginx keeps unknown escapes verbatim (regexes need "\d").
                out.append(c + nxt)
            if nxt == "\n":
                line += 1
            i += 2
            continue
        if c == quote:
            return "".join(out), i + 1, line
        if c == "\n":
            line += 1
        out.append(c)
        i += 1
    raise ConfigError("unexpected end of file, expecting terminating quote", file, line)


def _read_word(text: str, i: int, line: int, file: str) -> tuple[str, int, int]:
    start = i
    n = len(text)
    in_var_braces = False
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            i += 2
            continue
        if in_var_braces:
            if c == "}":
                in_var_braces = False
            elif c in " \t\r\n;{":
                raise ConfigError('the closing bracket in variable is missing', file, line)
            i += 1
            continue
        if c == "$" and i + 1 < n and text[i + 1] == "{":
            in_var_braces = True
            i += 2
            continue
        if c in " \t\r\n;{}":
            break
        if c in "\"'" and i > start:
            # A quote inside a bare word is literal in nginx only after the
            # first character; keep it so values like a"b survive.
            i += 1
            continue
        i += 1
    if in_var_braces:
        raise ConfigError('the closing bracket in variable is missing', file, line)
    word = text[start:i]
    if "\\" in word:
        word = _unescape_bare(word)
    return word, i, line


def _unescape_bare(word: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i] == "\\" and i + 1 < len(word) and word[i + 1] in "\"'\\; {}":
            out.append(word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return "".join(out)
