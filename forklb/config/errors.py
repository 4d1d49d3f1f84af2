"""The one exception every configuration problem becomes."""

from __future__ import annotations

COMMAND_LINE = "command line"  # the "file" of -g directives, as nginx names it


class ConfigError(Exception):
    """A configuration error, worded like nginx's ``[emerg]`` messages.

    ``str(err)`` gives ``message in file:line`` (or ``in command line`` for
    ``-g`` directives), ready to print after ``forklb: [emerg] ``.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line

    def __str__(self) -> str:
        if self.file == COMMAND_LINE:
            return f"{self.message} in command line"
        if self.file is None:
            return self.message
        return f"{self.message} in {self.file}:{self.line}"
