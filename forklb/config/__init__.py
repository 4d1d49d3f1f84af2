"""nginx-syntax configuration: lexer, parser, directive table, validation, model building."""

from forklb.config.errors import ConfigError
from forklb.config.loader import load

__all__ = ["ConfigError", "load"]
