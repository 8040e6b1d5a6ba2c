"""phonebind-console: the reviewers' web console over phonebind's gRPC API."""

from .app import create_app
from .config import ConfigError, ConsoleConfig, OidcConfig

__all__ = ["ConfigError", "ConsoleConfig", "OidcConfig", "create_app"]
