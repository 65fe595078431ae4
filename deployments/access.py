"""API keys: who may call the HTTP routes.

Keys come from the app args (`api_keys`, `admin_api_keys`) and the environment of the ingress
replicas (`LAMPS_API_KEYS`, `LAMPS_ADMIN_API_KEYS`: comma- or space-separated). Only their
SHA-256 digests are kept and compared (in constant time), so a key does not sit in the Serve
config's bound arguments or a replica's memory in the clear. No keys is allowed only while the
HTTP proxy listens on loopback: then nothing outside this machine can reach it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from deployments.errors import (
    AdminDisabledError,
    AuthenticationError,
    InsecureConfigError,
    PermissionDeniedError,
)

API_KEYS_ENV = "LAMPS_API_KEYS"
ADMIN_API_KEYS_ENV = "LAMPS_ADMIN_API_KEYS"
MIN_KEY_LENGTH = 16


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def checked_keys(keys: Iterable[str], what: str) -> list[str]:
    """`keys` stripped; a short key is a config error (a guessable key is no protection)."""
    cleaned = [k.strip() for k in keys if k.strip()]
    short = [k for k in cleaned if len(k) < MIN_KEY_LENGTH]
    if short:
        raise ValueError(f"{what}: every key needs at least {MIN_KEY_LENGTH} characters")
    return cleaned


def env_keys(name: str, environ: Mapping[str, str] | None = None) -> list[str]:
    value = (os.environ if environ is None else environ).get(name, "")
    return checked_keys(re.split(r"[,\s]+", value), name)


class ApiKeys(BaseModel):
    """Digests of the keys that open the normal routes and of those that open admin routes
    (an admin key opens the normal routes too)."""

    model_config = ConfigDict(frozen=True)

    user: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()

    @classmethod
    def from_keys(cls, user: Iterable[str] = (), admin: Iterable[str] = ()) -> ApiKeys:
        return cls(
            user=frozenset(key_digest(k) for k in user),
            admin=frozenset(key_digest(k) for k in admin),
        )

    def merged(self, other: ApiKeys) -> ApiKeys:
        return ApiKeys(user=self.user | other.user, admin=self.admin | other.admin)

    @property
    def required(self) -> bool:
        """Whether normal routes need a key."""
        return bool(self.user)

    def authorize(self, authorization: str | None, *, admin: bool = False) -> None:
        """Raise the 401/403/404 error for this `Authorization` header on a route."""
        if admin and not self.admin:
            raise AdminDisabledError("admin routes are off on this server (no admin key set)")
        if not admin and not self.required:
            return
        token = _bearer(authorization)
        if token is None:
            raise AuthenticationError("an API key is required: Authorization: Bearer <key>")
        presented = key_digest(token)
        if _known(presented, self.admin):
            return
        if _known(presented, self.user):
            if admin:
                raise PermissionDeniedError("this route needs an admin key")
            return
        raise AuthenticationError("the API key is not valid")


def check_exposure(host: str | None, keys: ApiKeys) -> None:
    """Refuse to serve without API keys on anything but loopback."""
    if keys.required or (host is not None and is_loopback(host)):
        return
    where = f"HTTP host {host!r}" if host is not None else "an HTTP host that could not be read"
    raise InsecureConfigError(
        f"refusing to serve on {where} without API keys: set `api_keys` in the app args or "
        f"{API_KEYS_ENV} in the replicas' environment, or bind http_options.host to 127.0.0.1"
    )


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: whatever it resolves to, not provably local


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _known(digest: str, digests: frozenset[str]) -> bool:
    # Every digest compared, in constant time each: timing says nothing about which matched.
    found = False
    for known in digests:
        found |= hmac.compare_digest(digest, known)
    return found
