"""XOAUTH2 access tokens for IMAP: from a configured command, or by the OAuth 2.0
refresh-token grant (RFC 6749 6) against the provider's token endpoint.

A refresh token the provider refuses (invalid_grant: revoked, expired, password changed)
cannot mend itself: it raises TokenRevoked, which the poller turns into an alert at once
instead of retrying in silence (issue 7).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.inbound.imap_client import ImapProblem, read_secret
from gateway.settings_imap import ImapSettings, OAuthRefresh

TOKEN_HTTP_TIMEOUT_S = 30.0
EXPIRY_MARGIN_S = 60.0  # refresh this long before the provider says the token expires
# RFC 6749 5.2: errors that say the grant itself is dead; anything else may pass.
PERMANENT_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client",
                              "unsupported_grant_type", "invalid_scope"})


class TokenRevoked(ImapProblem):
    """The refresh token can no longer be used: a person must authorize deskgate again."""


@dataclass(frozen=True, slots=True)
class Granted:
    access_token: str
    expires_in_s: float
    refresh_token: str | None  # a rotated refresh token, to keep instead of the old one


def token_form(oauth: OAuthRefresh, refresh_token: str, client_secret: str | None
               ) -> dict[str, str]:
    """The form body of the refresh request (RFC 6749 6; client_secret_post, 2.3.1)."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": oauth.client_id}
    if client_secret:
        form["client_secret"] = client_secret
    if oauth.scope:
        form["scope"] = oauth.scope
    return form


def token_answer(status: int, body: bytes, url: str) -> Granted:
    """The endpoint's answer -> a token, TokenRevoked (dead grant) or ImapProblem (retry)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ImapProblem(f"token endpoint {url} answered {status} without JSON")
    if status == 200 and isinstance(data.get("access_token"), str) and data["access_token"]:
        expires = data.get("expires_in")
        rotated = data.get("refresh_token")
        return Granted(data["access_token"],
                       float(expires) if isinstance(expires, int | float) else 3600.0,
                       rotated if isinstance(rotated, str) and rotated else None)
    error = str(data.get("error") or f"HTTP {status}")
    detail = str(data.get("error_description") or "")[:200]
    reason = f"token endpoint {url} refused the refresh token: {error}" + \
        (f" ({detail})" if detail else "")
    if error in PERMANENT_ERRORS:
        raise TokenRevoked(reason + "; authorize deskgate again and replace the "
                           "refresh_token_file")
    raise ImapProblem(reason)


def _write_private(path: Path, text: str) -> None:
    """Replace the file atomically, readable only by deskgate."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    os.replace(tmp, path)


class TokenSource:
    """The secret for one mailbox's login: password, command output, or a cached token."""

    def __init__(self, cfg: ImapSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._token: str | None = None
        self._valid_until = 0.0

    def forget(self) -> None:
        """The server refused the token: the next login asks for a fresh one."""
        self._token = None

    async def secret(self) -> str:
        if self.cfg.oauth is None:  # a password, or token_command run per login
            return await read_secret(self.cfg)
        if self._token is None or self.clock() >= self._valid_until:
            granted = await self._refresh()
            self._token = granted.access_token
            self._valid_until = self.clock() + max(0.0, granted.expires_in_s - EXPIRY_MARGIN_S)
        return self._token

    async def _refresh(self) -> Granted:
        oauth = self.cfg.oauth
        assert oauth is not None
        refresh_file = Path(oauth.refresh_token_file)
        refresh_token = _read(refresh_file, "refresh_token_file")
        secret = _read(Path(oauth.client_secret_file), "client_secret_file") \
            if oauth.client_secret_file else None
        timeout = aiohttp.ClientTimeout(total=TOKEN_HTTP_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
                    oauth.token_url, data=token_form(oauth, refresh_token, secret),
                    headers={"Accept": "application/json"}) as response:
                body = await response.content.read(64 * 1024)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ImapProblem(f"token endpoint {oauth.token_url}: "
                              f"{type(exc).__name__}: {exc}"[:300]) from None
        granted = token_answer(status, body, oauth.token_url)
        if granted.refresh_token and granted.refresh_token != refresh_token:
            try:  # providers that rotate refresh tokens retire the old one (RFC 6819 5.2.2.3)
                _write_private(refresh_file, granted.refresh_token)
            except OSError as exc:
                raise ImapProblem(f"refresh_token_file {refresh_file}: cannot keep the "
                                  f"rotated refresh token: {exc.strerror}") from None
        return granted


def _read(path: Path, key: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ImapProblem(f"{key} {path}: {exc.strerror}") from None
    if not value:
        raise ImapProblem(f"{key} {path} is empty")
    return value
