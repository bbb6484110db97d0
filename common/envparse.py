"""Typed reading of environment variables; every bad value is a ConfigError naming the variable."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

# The repository, and the token table file both sides use unless TOKEN_FILE says otherwise.
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOKEN_FILE = os.path.join(REPO_DIR, "var", "tokens.json")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable and the value."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        super().__init__(f"{name}={value!r}: {reason}")
        self.name = name


class Env:
    """Reads variables from one mapping (os.environ by default) with defaults and validation."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def raw(self, name: str, default: str) -> str:
        value = self._environ.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def string(self, name: str, default: str = "") -> str:
        return self.raw(name, default)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, "true" if default else "false")
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(name, value, "expected true or false")

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float = 0.0,
        allow_zero: bool = True,
    ) -> float:
        value = self.raw(name, repr(default))
        try:
            parsed = float(value)
        except ValueError:
            raise ConfigError(name, value, "expected a number") from None
        if not math.isfinite(parsed):
            raise ConfigError(name, value, "expected a finite number")
        if parsed < minimum or (parsed == 0 and not allow_zero):
            bound = f"greater than {minimum:g}" if not allow_zero else f"at least {minimum:g}"
            raise ConfigError(name, value, f"must be {bound}")
        return parsed

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(name, str(default))
        try:
            parsed = int(value)
        except ValueError:
            raise ConfigError(name, value, "expected a whole number") from None
        if parsed < minimum:
            raise ConfigError(name, value, f"must be at least {minimum}")
        if maximum is not None and parsed > maximum:
            raise ConfigError(name, value, f"must be at most {maximum}")
        return parsed

    def url(self, name: str, default: str) -> str:
        value = self.raw(name, default)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError(name, value, f"not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(name, value, "expected an http:// or https:// URL with a host")
        return value.rstrip("/")

    def path(self, name: str) -> str:
        """An existing file or directory (made absolute), or "" when unset."""
        value = self.raw(name, "")
        if value and not os.path.exists(value):
            raise ConfigError(name, value, "no such file or directory")
        return os.path.abspath(value) if value else ""

    def _url_with_secret(self, name: str):
        """(value, value with the password shown as ***, its parts); ("", "", None) when unset."""
        value = self.raw(name, "")
        if not value:
            return "", "", None
        shown = without_password(value)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(name, shown, "not a valid URL (bad port?)") from None
        return value, shown, parts

    def proxy_url(self, name: str) -> str:
        """http://[user:password@]host:port, or "" when unset. Errors never repeat the password."""
        value, shown, parts = self._url_with_secret(name)
        if not value:
            return ""
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ConfigError(name, shown, "expected http://[user:password@]host:port")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(name, shown, "expected no path, query or fragment")
        return value.rstrip("/")

    def redis_url(self, name: str) -> str:
        """redis://[user:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/socket,
        or "" when unset. Errors never repeat the password."""
        value, shown, parts = self._url_with_secret(name)
        if not value:
            return ""
        if parts.scheme in ("redis", "rediss"):
            if not parts.hostname:
                raise ConfigError(name, shown, "expected redis://host[:port][/db]")
            if parts.path not in ("", "/") and not parts.path.lstrip("/").isdigit():
                raise ConfigError(name, shown, "the path must be a database number (redis://host:port/0)")
        elif parts.scheme == "unix":
            if not parts.path.startswith("/"):
                raise ConfigError(name, shown, "expected unix:///absolute/path/to/redis.sock")
        else:
            raise ConfigError(name, shown, "expected redis://host[:port], rediss://... or unix:///path")
        return value

    def listen_addr(self, name: str, default: str) -> tuple[str, int]:
        """':6800' or 'host:port'. An empty host means all interfaces, as in Go."""
        value = self.raw(name, default)
        host, sep, port_text = value.rpartition(":")
        if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(name, value, "expected HOST:PORT or :PORT")
        host = host.strip("[]") or "0.0.0.0"
        return host, int(port_text)

    def csv(self, name: str) -> tuple[str, ...]:
        value = self.raw(name, "")
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def choice(self, name: str, default: str, choices: Mapping[str, str]) -> str:
        value = self.raw(name, default)
        try:
            return choices[value.lower()]
        except KeyError:
            raise ConfigError(name, value, f"expected one of {', '.join(choices)}") from None


def metrics_dir(env: Env, token_file: str) -> str:
    """METRICS_DIR, else <PROXY_RUN_DIR>/metrics, else a metrics/ folder beside the token file."""
    default = os.path.join(os.path.dirname(token_file), "metrics")
    run_dir = env.string("PROXY_RUN_DIR")
    if run_dir:
        default = os.path.join(run_dir, "metrics")
    return os.path.abspath(env.string("METRICS_DIR", default))


def without_password(url: str) -> str:
    """The URL with the password of its userinfo replaced by '***' (for logs and messages)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"
