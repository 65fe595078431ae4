"""HTTP GET restricted to an allowlist of hosts, with a capped, text-only body.

The model chooses the URL, so without an allowlist this would be an open proxy into
our cluster network; the default allowlist is therefore empty (every call refused).
Host names are not enough: a name is resolved here, and loopback, private, link-local,
multicast and reserved addresses are refused unless an IP allowlist (CIDRs) admits them;
the request goes to the address checked, and every redirect hop is checked again.
"""

from __future__ import annotations

import asyncio
import codecs
import ipaddress
import json
import socket
from collections.abc import Iterable
from typing import Any, ClassVar
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import Field, field_validator

from tool_workers.tools import Tool, ToolArgs, ToolError, ToolOutput

__all__ = ["DEFAULT_MAX_BODY_BYTES", "HttpGet", "HttpGetArgs"]

DEFAULT_MAX_BODY_BYTES = 4096
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_REDIRECTS = 5
MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class HttpGetArgs(ToolArgs):
    url: str = Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="Absolute http:// or https:// URL to fetch with GET.",
    )

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError("only http:// and https:// URLs are allowed")
        if not parts.hostname:
            raise ValueError("URL has no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("URLs with credentials are not allowed")
        return url


def _network(cidr: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(cidr.strip())
    except ValueError as exc:  # strict: "10.0.0.5/8" is a typo, not a wish for all of 10/8
        raise ValueError(f"http_allow_ips: {exc}") from None


class HttpGet(Tool[HttpGetArgs]):
    name: ClassVar[str] = "http_get"
    description: ClassVar[str] = (
        "Fetch a URL with HTTP GET from an allowlist of hosts. Returns JSON with the status, "
        "content type and the start of the body as text."
    )
    args_model = HttpGetArgs

    def __init__(
        self,
        allowlist: Iterable[str] = (),
        *,
        allow_ips: Iterable[str] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        trust_env: bool = False,
    ) -> None:
        # Exact host names (no wildcards): simple to audit, and "evil.com.example" tricks fail.
        self.allowlist = frozenset(h.strip().lower().rstrip(".") for h in allowlist if h.strip())
        self.allow_ips = tuple(_network(cidr) for cidr in allow_ips)
        self.request_timeout_s = timeout_s
        # The worker's own deadline leaves room for the whole fetch to time out on its own.
        self.timeout_s = timeout_s + 5.0
        self.max_body_bytes = max_body_bytes
        self.max_redirects = max_redirects
        # Off by default: a proxy from the environment would make the address checks about
        # the proxy, not about where the request really goes.
        self.trust_env = trust_env

    def set_timeout(self, seconds: float) -> None:
        super().set_timeout(seconds)
        self.request_timeout_s = seconds - min(5.0, 0.2 * seconds)

    def check_allowed(self, url: str) -> None:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if not self.allowlist:
            raise ToolError("http_get is disabled: no hosts are allowlisted")
        if host not in self.allowlist:
            raise ToolError(
                f"host {host!r} is not allowlisted (allowed: {', '.join(sorted(self.allowlist))})"
            )

    def address_refusal(self, ip: IPAddress) -> str | None:
        """Why a connection to ``ip`` is refused (None: allowed). Anything but a public unicast
        address is refused unless ``allow_ips`` admits it: an allowlisted name that resolves to
        the cluster network (or is made to, by its DNS) must not reach it."""
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        for candidate in (ip, mapped):
            if candidate is not None and any(candidate in net for net in self.allow_ips):
                return None
        ip = mapped or ip
        for kind, bad in (
            ("loopback", ip.is_loopback),
            ("unspecified", ip.is_unspecified),
            ("link-local", ip.is_link_local),
            ("multicast", ip.is_multicast),
            ("reserved", ip.is_reserved),
            ("private", ip.is_private),
            ("non-public", not ip.is_global),
        ):
            if bad:
                return f"{kind} address {ip}"
        return None

    async def __call__(self, args: HttpGetArgs) -> ToolOutput:
        try:
            # One deadline for the whole fetch, name resolution and redirects included.
            async with asyncio.timeout(self.request_timeout_s):
                result = await self._fetch(args.url)
        except TimeoutError:
            raise ToolError(f"request timed out after {self.request_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"request failed: {type(exc).__name__}: {exc}") from None
        return ToolOutput(output=json.dumps(result, ensure_ascii=False))

    async def _fetch(self, url: str) -> dict[str, Any]:
        """GET ``url``, following redirects by hand: every hop's host and address are checked
        as the first one's are."""
        for _ in range(self.max_redirects + 1):
            result, location = await self._get_once(url)
            if location is None:
                return result
            url = urljoin(url, location)
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise ToolError(f"redirected to a URL that is not http(s): {url[:200]!r}")
        raise ToolError(f"more than {self.max_redirects} redirects")

    async def _get_once(self, url: str) -> tuple[dict[str, Any], str | None]:
        self.check_allowed(url)
        parts = urlsplit(url)
        host = parts.hostname or ""
        ip = await self._resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
        # Connect to the address just checked, not to the name: a second lookup (by the HTTP
        # client) could get another answer (DNS rebinding). Host header and TLS name stay the
        # name's, so virtual hosts and certificates work as usual.
        target = httpx.URL(url).copy_with(host=str(ip))
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        async with (
            httpx.AsyncClient(
                timeout=self.request_timeout_s, follow_redirects=False, trust_env=self.trust_env
            ) as client,
            client.stream("GET", target, headers=headers, extensions=extensions) as response,
        ):
            location = response.headers.get("location") if response.is_redirect else None
            if location is not None:
                return {}, location
            body, truncated = await self._read_capped(response)
            return {
                "status": response.status_code,
                "content_type": response.headers.get("content-type"),
                "body": body,
                "truncated": truncated,
            }, None

    async def _resolve(self, host: str, port: int) -> IPAddress:
        """The address to connect to; refused if any address the name has is refused (which
        one a client would pick is not ours to guess)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise ToolError(f"cannot resolve {host!r}: {exc}") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        for ip in addresses:
            refusal = self.address_refusal(ip)
            if refusal is not None:
                raise ToolError(f"host {host!r} resolves to a {refusal}: refused")
        if not addresses:
            raise ToolError(f"cannot resolve {host!r}: no addresses")
        return addresses[0]

    async def _read_capped(self, response: httpx.Response) -> tuple[str, bool]:
        """Read at most max_body_bytes (we stop downloading there) and decode as text."""
        chunks: list[bytes] = []
        size = 0
        truncated = False
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                truncated = True
                break
        raw = b"".join(chunks)[: self.max_body_bytes]
        encoding = response.charset_encoding or "utf-8"
        try:
            decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        except LookupError:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # final=False when cut: a multi-byte character split at the cap is dropped, not garbled.
        return decoder.decode(raw, final=not truncated), truncated
