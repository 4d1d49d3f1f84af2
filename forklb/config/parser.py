"""Parser from tokens to a directive tree, with ``include`` expanded.

The tree is purely syntactic: a :class:`Directive` is a name, its argument
tokens and, for block directives, the directives inside the braces.  Whether a
directive exists, where it may stand and how many arguments it takes is
checked afterwards against the directive table (:mod:`forklb.config.directives`),
exactly once, by :func:`forklb.config.loader.check_tree`.

``include`` is expanded here because it splices other files into the token
stream, in any context, as nginx does.  Relative patterns resolve against the
directory of the main configuration file; globs expand in sorted order, and a
pattern with no glob characters must name an existing file.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass

from forklb.config.errors import COMMAND_LINE, ConfigError
from forklb.config.lexer import Token, tokenize, unexpected_end

MAX_INCLUDE_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Directive:
    """One directive: ``name arg...;`` or ``name arg... { children }``.

    ``line`` is the line of the terminating ``;`` or ``{``, where nginx reports
    the directive's errors; ``end_line`` is the line of a block's closing ``}``
    (errors found once the block is read), else ``line``.
    """

    name: str
    args: tuple[Token, ...]
    children: tuple[Directive, ...] | None
    file: str
    line: int
    end_line: int = 0

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(t.text for t in self.args)

    def where(self) -> tuple[str, int]:
        return self.file, self.line


class Parser:
    """Builds the directive tree of one main file (and what it includes)."""

    def __init__(self, conf_dir: str):
        self.conf_dir = conf_dir
        self.files: list[str] = []

    def parse_file(self, path: str, display: str | None = None, depth: int = 0) -> list[Directive]:
        """Parse the file at ``path``; errors name it as ``display``."""
        name = display or path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f'open() "{path}" failed ({e.errno}: {e.strerror})') from None
        except UnicodeDecodeError:
            raise ConfigError(f'"{path}" is not valid UTF-8') from None
        self.files.append(path)
        return self.parse_text(text, name, depth)

    def parse_text(self, text: str, file: str, depth: int = 0) -> list[Directive]:
        """Parse ``text``; ``file`` names it (``"command line"`` for ``-g``)."""
        eof_line = text.count("\n") + 1  # nginx counts the line after the last newline
        directives, _end = self._block(tokenize(text, file), file, eof_line, depth, opener=None)
        return directives

    def _block(
        self, tokens: Iterator[Token], file: str, eof_line: int, depth: int, opener: Token | None
    ) -> tuple[list[Directive], int]:
        """Read directives up to the ``}`` matching ``opener`` (or end of file).

        Returns them with the line the block ends on.
        """
        out: list[Directive] = []
        words: list[Token] = []
        for tok in tokens:
            if not tok.is_punct:
                words.append(tok)
                continue
            if tok.text == "}":
                if words or opener is None:
                    raise ConfigError('unexpected "}"', tok.file, tok.line)
                return out, tok.line
            if not words:
                raise ConfigError(f'unexpected "{tok.text}"', tok.file, tok.line)
            head, args = words[0], tuple(words[1:])
            words = []
            if tok.text == ";":
                if head.text == "include" and not head.quoted:
                    out.extend(self._include(head, args, depth, tok.line))
                else:
                    out.append(Directive(head.text, args, None, tok.file, tok.line, tok.line))
            else:  # "{"
                if file == COMMAND_LINE:
                    raise ConfigError("block directives are not supported in -g option", file)
                inner, end = self._block(tokens, file, eof_line, depth, opener=tok)
                out.append(Directive(head.text, args, tuple(inner), tok.file, tok.line, end))
        if words:
            raise unexpected_end(file, eof_line)
        if opener is not None:
            raise ConfigError('unexpected end of file, expecting "}"', file, eof_line)
        return out, eof_line

    def _include(
        self, head: Token, args: tuple[Token, ...], depth: int, line: int
    ) -> list[Directive]:
        """Expand ``include`` (its ``;`` is on ``line``)."""
        if len(args) != 1:
            raise ConfigError('invalid number of arguments in "include" directive',
                              head.file, line)
        if depth >= MAX_INCLUDE_DEPTH:
            raise ConfigError("include nesting is too deep", head.file, line)
        pattern = args[0].text
        full = pattern if os.path.isabs(pattern) else os.path.join(self.conf_dir, pattern)
        if glob.has_magic(full):
            paths = sorted(glob.glob(full))
        elif os.path.exists(full):
            paths = [full]
        else:
            raise ConfigError(f'open() "{full}" failed (2: No such file or directory)',
                              head.file, line)
        out: list[Directive] = []
        for path in paths:
            out.extend(self.parse_file(path, depth=depth + 1))
        return out
