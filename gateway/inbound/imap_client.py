"""IMAP protocol steps over aioimaplib: connect with TLS and login, select, search, fetch,
and the after-import action. No policy: the poller (inbound/imap.py) decides what to call."""

from __future__ import annotations

import asyncio
import os
import shlex
import ssl
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from aioimaplib import aioimaplib

from gateway.inbound import imap_plan as plan
from gateway.settings_imap import ImapSettings

COMMAND_TIMEOUT_S = 60.0
TOKEN_COMMAND_TIMEOUT_S = 30.0


class ImapProblem(Exception):
    """A readable reason a mailbox cannot be read now (stored in last_error)."""


def _text(response: Any) -> str:
    lines = [bytes(line) for line in response.lines if not isinstance(line, bytearray)]
    return (lines[-1] if lines else b"").decode("utf-8", "replace")[:200]


def _ok(response: Any, what: str) -> Any:
    if response.result != "OK":
        raise ImapProblem(f"{what} refused: {response.result} {_text(response)}")
    return response


def _quote(mailbox: str) -> str:
    """RFC 3501 9 (astring): quote a folder name with spaces or specials."""
    if mailbox and all(c.isalnum() or c in "._-/" for c in mailbox):
        return mailbox
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def read_secret(cfg: ImapSettings) -> str:
    """The password (file or environment) or an XOAUTH2 access token (command); never logged.

    The refresh-token flow lives in imap_oauth.TokenSource, which calls this for the rest.
    """
    if cfg.auth == "xoauth2":
        assert cfg.token_command
        return await run_token_command(cfg.token_command)
    if cfg.password_file:
        try:
            return Path(cfg.password_file).read_text().strip()
        except OSError as exc:
            raise ImapProblem(f"password_file {cfg.password_file}: {exc.strerror}") from None
    value = os.environ.get(cfg.password_env or "")
    if not value:
        raise ImapProblem(f"environment variable {cfg.password_env} is not set")
    return value


async def run_token_command(command: str) -> str:
    """A command that prints a fresh access token, run per login; its output never logged."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(command), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise ImapProblem(f"token_command cannot run: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(TOKEN_COMMAND_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        _kill(proc)
        raise ImapProblem(f"token_command took longer than {TOKEN_COMMAND_TIMEOUT_S:.0f}s") \
            from None
    except asyncio.CancelledError:  # the poller stopping: the command must not outlive it
        _kill(proc)
        raise
    token = out.decode(errors="replace").strip()
    if proc.returncode != 0 or not token:
        raise ImapProblem(f"token_command failed (exit {proc.returncode}): "
                          f"{err.decode(errors='replace').strip()[:200]}")
    return token


def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill it if it still runs: one that just exited raises ProcessLookupError, which
    would turn a stop (a cancellation) into an error."""
    with suppress(ProcessLookupError):
        proc.kill()


async def _starttls(client: aioimaplib.IMAP4, host: str, context: ssl.SSLContext) -> None:
    """RFC 3501 6.2.1: STARTTLS, then forget the capabilities learnt in clear text."""
    protocol = client.protocol
    if "STARTTLS" not in protocol.capabilities:
        raise ImapProblem("the server does not offer STARTTLS")
    _ok(await protocol.execute(aioimaplib.Command("STARTTLS", protocol.new_tag(),
                                                  loop=protocol.loop)), "STARTTLS")
    transport = await protocol.loop.start_tls(protocol.transport, protocol, context,
                                              server_hostname=host)
    protocol.transport = transport
    await protocol.capability()


async def connect(cfg: ImapSettings, context: ssl.SSLContext | None = None,
                  timeout_s: float = COMMAND_TIMEOUT_S,
                  secret: Callable[[], Awaitable[str]] | None = None) -> aioimaplib.IMAP4:
    """A logged-in client; TLS as configured (plain text only when the config allows it).

    `secret` gives the password or access token (imap_oauth.TokenSource.secret); without
    it the password or token_command is read from the configuration.
    """
    if context is None and cfg.tls != "none":
        try:
            context = ssl.create_default_context(cafile=cfg.ca_file)
        except OSError as exc:
            raise ImapProblem(f"ca_file {cfg.ca_file}: {exc.strerror or exc}") from None
    if cfg.tls == "implicit":
        client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(cfg.host, cfg.port, timeout=timeout_s,
                                                        ssl_context=context)
    else:
        client = aioimaplib.IMAP4(cfg.host, cfg.port, timeout=timeout_s)
    try:
        await client.wait_hello_from_server()
        if cfg.tls == "starttls":
            assert context is not None
            await _starttls(client, cfg.host, context)
        password = await (secret or (lambda: read_secret(cfg)))()
        if cfg.auth == "xoauth2":
            response = await client.xoauth2(cfg.user, password)
        else:
            response = await client.login(cfg.user, password)
        _ok(response, f"{'XOAUTH2 ' if cfg.auth == 'xoauth2' else ''}login as {cfg.user}")
        await client.protocol.capability()  # IDLE, MOVE, UIDPLUS are announced after login
    except BaseException:
        close(client)
        raise
    return client


def close(client: aioimaplib.IMAP4) -> None:
    transport = getattr(client.protocol, "transport", None)
    if transport is not None:
        transport.close()


async def select(client: aioimaplib.IMAP4, folder: str, readonly: bool = False
                 ) -> plan.FolderInfo:
    """SELECT (or EXAMINE, read-only) the folder: its UIDVALIDITY, UIDNEXT, message count."""
    verb = "EXAMINE" if readonly else "SELECT"
    command = client.examine if readonly else client.select
    response = _ok(await command(_quote(folder)), f"{verb} {folder}")
    info = plan.parse_select(response.lines)
    if info.uidvalidity is None:
        raise ImapProblem(f"{verb} {folder}: the server sent no UIDVALIDITY")
    return info


async def uidnext(client: aioimaplib.IMAP4, info: plan.FolderInfo) -> int:
    """UIDNEXT from SELECT, else one above the highest UID in use (RFC 3501 2.3.1.1)."""
    if info.uidnext is not None:
        return info.uidnext
    found = await search_uids(client, 0)
    return max(found, default=0) + 1


async def search_uids(client: aioimaplib.IMAP4, after_uid: int) -> list[int]:
    response = _ok(await client.uid_search("UID", f"{after_uid + 1}:*", charset=None),
                   "UID SEARCH")
    return plan.pending_uids(plan.parse_search(response.lines), after_uid)


async def sizes(client: aioimaplib.IMAP4, uids: Sequence[int]) -> list[tuple[int, int]]:
    """(uid, RFC822.SIZE) of each message: what to fetch, what is too big to."""
    response = _ok(await client.uid("fetch", plan.uid_set(uids), "(UID RFC822.SIZE)"),
                   "UID FETCH RFC822.SIZE")
    return sorted(plan.parse_sizes(response.lines))


async def fetch_header(client: aioimaplib.IMAP4, uid: int) -> bytes:
    """Only the header section of a message that is too big to import (a record for people)."""
    response = _ok(await client.uid("fetch", str(uid), "(UID BODY.PEEK[HEADER])"),
                   "UID FETCH HEADER")
    found = plan.parse_fetch(response.lines)
    return found[0][1] if found else b""


async def fetch(client: aioimaplib.IMAP4, uids: Sequence[int]) -> list[tuple[int, bytes]]:
    # BODY.PEEK: fetching must not set \Seen; only a committed import may (RFC 3501 6.4.5).
    response = _ok(await client.uid("fetch", plan.uid_set(uids), "(UID BODY.PEEK[])"),
                   "UID FETCH")
    return sorted(plan.parse_fetch(response.lines))


async def apply_action(client: aioimaplib.IMAP4, cfg: ImapSettings, uids: str) -> None:
    """The after-import action on a UID set: flag \\Seen, move, or delete and expunge."""
    action = cfg.after_import
    if action.action == "seen":
        _ok(await client.uid("store", uids, "+FLAGS.SILENT", r"(\Seen)"), "UID STORE \\Seen")
        return
    if action.action == "move" and client.has_capability("MOVE"):  # RFC 6851
        _ok(await client.uid("move", uids, _quote(action.folder)), f"UID MOVE {action.folder}")
        return
    if action.action == "move":
        _ok(await client.uid("copy", uids, _quote(action.folder)), f"UID COPY {action.folder}")
    _ok(await client.uid("store", uids, "+FLAGS.SILENT", r"(\Deleted)"), "UID STORE \\Deleted")
    if client.has_capability("UIDPLUS"):  # RFC 4315: expunge only what we deleted
        _ok(await client.uid("expunge", uids), "UID EXPUNGE")
    else:
        _ok(await client.expunge(), "EXPUNGE")


async def ensure_folder(client: aioimaplib.IMAP4, folder: str) -> None:
    """Create the move target; "already exists" is the usual, harmless answer."""
    await client.create(_quote(folder))


async def logout(client: aioimaplib.IMAP4) -> None:
    with suppress(Exception):
        if not client.has_pending_idle():
            await asyncio.wait_for(client.logout(), 2)
    close(client)
