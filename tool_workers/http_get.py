"""HTTP GET restricted to an allowlist of hosts, with a capped, text-only body.

The model chooses the URL, so without an allowlist this would be an open proxy into
our cluster network; the default allowlist is therefore empty (every call refused).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from typing import ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import Field, field_validator

from tool_workers.tools import Tool, ToolArgs, ToolError, ToolOutput

__all__ = ["DEFAULT_MAX_BODY_BYTES", "HttpGet", "HttpGetArgs"]

DEFAULT_MAX_BODY_BYTES = 4096
DEFAULT_TIMEOUT_S = 10.0
MAX_URL_LENGTH = 2048


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
        return url


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
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        trust_env: bool = False,
    ) -> None:
        # Exact host names (no wildcards): simple to audit, and "evil.com.example" tricks fail.
        self.allowlist = frozenset(h.strip().lower().rstrip(".") for h in allowlist if h.strip())
        self.request_timeout_s = timeout_s
        # The worker's own deadline leaves room for the request's connect+read phases.
        self.timeout_s = timeout_s + 5.0
        self.max_body_bytes = max_body_bytes
        # Off by default: a proxy from the environment would make the allowlist check
        # about the URL but not about where the request really goes.
        self.trust_env = trust_env

    def check_allowed(self, url: str) -> None:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if not self.allowlist:
            raise ToolError("http_get is disabled: no hosts are allowlisted")
        if host not in self.allowlist:
            raise ToolError(
                f"host {host!r} is not allowlisted (allowed: {', '.join(sorted(self.allowlist))})"
            )

    async def __call__(self, args: HttpGetArgs) -> ToolOutput:
        self.check_allowed(args.url)
        try:
            # Redirects are not followed: the target could be outside the allowlist.
            async with (
                httpx.AsyncClient(
                    timeout=self.request_timeout_s,
                    follow_redirects=False,
                    trust_env=self.trust_env,
                ) as client,
                client.stream("GET", args.url) as response,
            ):
                body, truncated = await self._read_capped(response)
                result = {
                    "status": response.status_code,
                    "content_type": response.headers.get("content-type"),
                    "body": body,
                    "truncated": truncated,
                }
                if response.is_redirect:
                    result["location"] = response.headers.get("location")
        except httpx.TimeoutException:
            raise ToolError(f"request timed out after {self.request_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"request failed: {type(exc).__name__}: {exc}") from None
        return ToolOutput(output=json.dumps(result, ensure_ascii=False))

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
