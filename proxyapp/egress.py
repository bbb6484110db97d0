"""The egress proxy (UPSTREAM_PROXY, UPSTREAM_NO_PROXY): which upstream origins go through it.

Legacy VMs often reach the internet only through an HTTP proxy. requests' own proxy support does
the work (CONNECT tunnels for https upstreams, absolute-form requests for http ones); this module
only decides, once per upstream origin, whether a request takes the proxy.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from common.envparse import without_password


class EgressProxy:
    """One configured proxy URL and its bypass list (host names and ``.domain`` suffixes)."""

    def __init__(self, url: str, no_proxy: tuple[str, ...] = ()) -> None:
        parts = urlsplit(url)
        self.url = url
        self.safe_url = f"http://{parts.hostname}:{parts.port}"  # for messages: no credentials
        self.shown = without_password(url)  # for the start-up log line
        self.password = parts.password or ""
        self._proxies = {"http": url, "https": url}
        self._names = frozenset(entry.lower().strip("[]") for entry in no_proxy if not entry.startswith("."))
        self._suffixes = tuple(entry.lower() for entry in no_proxy if entry.startswith("."))
        self._by_origin: dict[str, dict[str, str] | None] = {}

    def bypassed(self, hostname: str) -> bool:
        hostname = hostname.lower().strip("[]")
        if hostname in self._names:
            return True
        # ".example.com" covers example.com itself and every name under it (as curl does).
        return any(hostname.endswith(suffix) or hostname == suffix[1:] for suffix in self._suffixes)

    def proxies_for(self, origin: str) -> dict[str, str] | None:
        """requests' ``proxies`` argument for this scheme://host[:port], decided once per origin."""
        try:
            return self._by_origin[origin]
        except KeyError:
            pass
        proxies = None if self.bypassed(urlsplit(origin).hostname or "") else self._proxies
        if len(self._by_origin) < 10000:  # origins come from the table: bounded, but be safe
            self._by_origin[origin] = proxies
        return proxies
