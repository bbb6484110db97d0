"""The backend admin API: fetch the token-model list (logging in first when so configured).

Every failure is a BackendError whose message is safe to log: it names the URL without
credentials and has every known secret masked.
"""

from __future__ import annotations

import json
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions

from common.jsonlog import mask_text

LIST_PATH = "/api/tokens/with-model"
LOGIN_PATH = "/api/auth/login"
CONNECT_TIMEOUT = 5.0
MAX_BODY_BYTES = 256 * 1024 * 1024  # ~700,000 rows; a bigger body is a backend fault, not a table
_READ_SIZE = 256 * 1024
_MESSAGE_LIMIT = 200


class BackendError(Exception):
    """The fetch failed. str() is safe to log (no credentials)."""

    def __init__(self, message: str, *, unauthorized: bool = False) -> None:
        super().__init__(message)
        self.unauthorized = unauthorized


def endpoint(base_url: str, path: str) -> str:
    """base_url with ``path`` appended to its path; any query is kept, the fragment dropped."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + path, parts.query, ""))


def safe_url(url: str) -> str:
    """The URL without userinfo, query or fragment: fit for logs and the table's ``source``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class BackendClient:
    """Fetches the rows. Keeps the login JWT between syncs and renews it on a 401."""

    def __init__(
        self,
        base_url: str,
        *,
        api_token: str = "",
        username: str = "",
        password: str = "",
        timeout: float = 30.0,
        secrets: tuple[str, ...] = (),
        ca_bundle: str = "",
    ) -> None:
        self.list_url = endpoint(base_url, LIST_PATH)
        self.login_url = endpoint(base_url, LOGIN_PATH)
        self.source = safe_url(self.list_url)
        self._api_token = api_token
        self._username = username
        self._password = password
        self._timeout = timeout
        self._secrets = tuple(s for s in (*secrets, api_token, password) if s)
        self._jwt = ""
        self._jwts: deque[str] = deque(maxlen=8)  # the JWTs issued lately, all masked in logs
        self._session = requests.Session()
        # No ~/.netrc (it would replace our bearer), no *_PROXY variables, no cookies kept.
        self._session.trust_env = False
        # An HTTPS backend with a private CA: SERVER_API_CA_BUNDLE (a PEM file or a directory of
        # hashed certificates) replaces certifi's bundle. One connection per sync: loading the
        # bundle per connection costs nothing that matters here.
        self._session.verify = ca_bundle or True

    def close(self) -> None:
        self._session.close()

    def secrets(self) -> tuple[str, ...]:
        """Every credential this client knows, the current JWT included."""
        return (*self._secrets, *self._jwts)

    def mask(self, text: str) -> str:
        return mask_text(text, self.secrets())

    def fetch_rows(self) -> list[Any]:
        """The ``data`` list of the token-model list call. Raises BackendError."""
        deadline = time.monotonic() + self._timeout
        if not self._username:
            return self._fetch_list(self._api_token, deadline)
        if not self._jwt:
            self._jwt = self._login(deadline)
        try:
            return self._fetch_list(self._jwt, deadline)
        except BackendError as exc:
            if not exc.unauthorized:
                raise
        # The JWT expired or was revoked: log in again once and retry once.
        self._jwt = ""
        self._jwt = self._login(deadline)
        return self._fetch_list(self._jwt, deadline)

    def _fetch_list(self, bearer: str, deadline: float) -> list[Any]:
        status, body = self._request("GET", self.list_url, bearer, deadline)
        reply = self._decode(status, body, "token list")
        data = reply.get("data")
        if not isinstance(data, list):
            raise BackendError(f"token list from {self.source}: 'data' is {type(data).__name__}, not a list")
        return data

    def _login(self, deadline: float) -> str:
        payload = {"username": self._username, "password": self._password}
        status, body = self._request("POST", self.login_url, "", deadline, payload)
        reply = self._decode(status, body, "login")
        data = reply.get("data")
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise BackendError(f"login at {safe_url(self.login_url)}: no token in the reply")
        self._jwts.append(token)
        return token

    def _decode(self, status: int, body: bytes, what: str) -> dict[str, Any]:
        """The JSON object of a reply, or BackendError for a non-200, non-JSON or code != 0 reply."""
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        code = reply.get("code") if isinstance(reply, dict) else None
        message = reply.get("message") if isinstance(reply, dict) else None
        detail = f": {self._short(message)}" if isinstance(message, str) and message else ""
        if status != 200:
            unauthorized = status == 401 or code == 401
            raise BackendError(f"{what}: HTTP {status}{detail}", unauthorized=unauthorized)
        if not isinstance(reply, dict):
            raise BackendError(f"{what}: the reply is not a JSON object ({len(body)} bytes)")
        if code != 0 or isinstance(code, bool):
            raise BackendError(f"{what}: code {self._short(repr(code))}{detail}", unauthorized=code == 401)
        return reply

    def _short(self, text: str) -> str:
        text = " ".join(text.split())
        if len(text) > _MESSAGE_LIMIT:
            text = text[:_MESSAGE_LIMIT] + "…"
        return self.mask(text)

    def _request(
        self, method: str, url: str, bearer: str, deadline: float, payload: object = None
    ) -> tuple[int, bytes]:
        """Status and whole body of one call, all within ``deadline``. Raises BackendError."""
        headers = {"Accept": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
            # As in Go: userinfo in the URL becomes Basic auth only when no bearer is sent.
            url = _without_userinfo(url)
        where = safe_url(url)
        remaining = self._remaining(deadline, where)
        try:
            response = self._session.request(
                method,
                url,
                headers=headers,
                json=payload,
                timeout=(min(CONNECT_TIMEOUT, remaining), remaining),
                stream=True,
                allow_redirects=False,
            )
            try:
                return response.status_code, self._read_body(response, deadline, where)
            finally:
                response.close()
        except BackendError:
            raise
        except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
            raise BackendError(f"{method} {where}: timed out after {self._timeout:g}s") from None
        except requests.exceptions.SSLError as exc:
            raise BackendError(f"{method} {where}: {_tls_failure(exc)}") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise BackendError(f"{method} {where}: timed out after {self._timeout:g}s") from None
            raise BackendError(f"{method} {where}: {self.mask(_root_cause(exc))}") from None

    def _read_body(self, response: requests.Response, deadline: float, where: str) -> bytes:
        # requests' read timeout applies between bytes; the total deadline is enforced here by
        # giving every single read only the time that is left.
        body = bytearray()
        while True:
            _set_socket_timeout(response, self._remaining(deadline, where))
            # read1: one socket read at most, so no call outlives the deadline by more than the
            # timeout just set; decode_content: requests leaves gzip to iter_content, not to raw.
            chunk = response.raw.read1(_READ_SIZE, decode_content=True)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise BackendError(f"{where}: reply larger than {MAX_BODY_BYTES} bytes")

    def _remaining(self, deadline: float, where: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendError(f"{where}: timed out after {self._timeout:g}s")
        return remaining


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _set_socket_timeout(response: requests.Response, seconds: float) -> None:
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _tls_failure(exc: BaseException) -> str:
    """Why TLS to the backend failed, in words an operator can act on."""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            break
        if isinstance(current, ssl.SSLCertVerificationError):
            return (
                f"the backend's TLS certificate could not be verified ({current.verify_message}); "
                "for a private CA set SERVER_API_CA_BUNDLE"
            )
        reason = getattr(current, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else None
        if nxt is None and current.args and isinstance(current.args[-1], BaseException):
            nxt = current.args[-1]
        current = nxt or current.__cause__ or current.__context__
    return f"TLS handshake failed ({_root_cause(exc)})"


def _root_cause(exc: BaseException) -> str:
    """The innermost OS-level reason ('Connection refused'), not urllib3's page-long repr."""
    seen: set[int] = set()
    current: BaseException | None = exc
    best = type(exc).__name__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if isinstance(current, urllib3.exceptions.ProtocolError | urllib3.exceptions.DecodeError):
            best = str(current.args[0]) if current.args else type(current).__name__
        reason = getattr(current, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else None
        if nxt is None and current.args and isinstance(current.args[-1], BaseException):
            nxt = current.args[-1]
        current = nxt or current.__cause__ or current.__context__
    return best
