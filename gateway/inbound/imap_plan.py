"""Pure decisions of the IMAP poller: where to resume, what to fetch next, how long to back off.

No sockets, no database: the adapter (inbound/imap.py) asks these and does what they say.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import parseaddr


@dataclass(frozen=True, slots=True)
class Resume:
    """Where the import continues after SELECT."""

    last_uid: int  # everything at or below this UID is already committed
    reset: bool  # UIDVALIDITY changed: the old UIDs mean nothing any more
    history_below: int | None = None  # from = "all": UIDs below this are history


def resume(checkpoint_uidvalidity: int | None, checkpoint_last_uid: int,
           server_uidvalidity: int, uidnext: int = 1, start_from: str = "now",
           history_below: int | None = None) -> Resume:
    """RFC 3501 2.3.1.1: UIDs are only comparable under the same UIDVALIDITY.

    The first contact starts at UIDNEXT (from = "now": only mail arriving from now on) or
    at UID 1 with everything below UIDNEXT marked as history (from = "all"). A changed
    UIDVALIDITY (folder recreated, server migrated) re-scans from UID 1; the ingest's
    duplicate detection keeps the mails already stored from becoming tickets twice.
    """
    if checkpoint_uidvalidity is None:
        if start_from == "all":
            return Resume(0, reset=False, history_below=uidnext)
        return Resume(max(0, uidnext - 1), reset=False)
    if checkpoint_uidvalidity != server_uidvalidity:
        return Resume(0, reset=True)
    return Resume(max(0, checkpoint_last_uid), reset=False, history_below=history_below)


def is_history(uid: int, history_below: int | None) -> bool:
    return history_below is not None and uid < history_below


@dataclass(frozen=True, slots=True)
class FolderInfo:
    """What SELECT/EXAMINE told about the folder (RFC 3501 7.3.1, 7.1)."""

    uidvalidity: int | None
    uidnext: int | None
    exists: int | None


def parse_select(lines: Sequence[bytes | bytearray]) -> FolderInfo:
    found: dict[str, int] = {}
    for line in lines:
        raw = bytes(line)
        for key, pattern in (("uidvalidity", _UIDVALIDITY), ("uidnext", _UIDNEXT),
                             ("exists", _EXISTS)):
            match = pattern.search(raw)
            if match and key not in found:
                found[key] = int(match.group("value"))
    return FolderInfo(found.get("uidvalidity"), found.get("uidnext"), found.get("exists"))


def byte_batches(sized: Sequence[tuple[int, int]], max_bytes: int
                 ) -> Iterator[list[tuple[int, int]]]:
    """(uid, size) pairs in groups whose bodies add up to at most max_bytes (a bigger mail
    alone). aioimaplib holds a whole FETCH answer in memory: this bounds it."""
    batch: list[tuple[int, int]] = []
    total = 0
    for uid, size in sorted(sized):
        if batch and total + size > max_bytes:
            yield batch
            batch, total = [], 0
        batch.append((uid, size))
        total += size
    if batch:
        yield batch


def fetch_plan(sized: Sequence[tuple[int, int]], limit: int, max_bytes: int
               ) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """In UID order: ("fetch", mails) bounded by max_bytes, or ("skip", [one too big]).

    UID order keeps the checkpoint monotonic: a skipped mail is passed in its place.
    """
    run: list[tuple[int, int]] = []
    for uid, size in sorted(sized):
        if size <= limit:
            run.append((uid, size))
            continue
        yield from (("fetch", group) for group in byte_batches(run, max_bytes))
        run = []
        yield "skip", [(uid, size)]
    yield from (("fetch", group) for group in byte_batches(run, max_bytes))


def parse_sizes(lines: Sequence[bytes | bytearray]) -> list[tuple[int, int]]:
    """(uid, size) from `UID FETCH … (UID RFC822.SIZE)`, items in any order."""
    found = []
    for line in lines:
        raw = bytes(line)
        uid, size = _UID.search(raw), _SIZE.search(raw)
        if uid and size:
            found.append((int(uid.group("uid")), int(size.group("size"))))
    return found


# A mailbox counts as failing (degraded in /healthz) after this many failures in a row:
# one dropped connection that the next attempt mends is not worth waking anyone.
FAILING_AFTER = 3


def is_failing(failures: int, alerting: bool) -> bool:
    return alerting or failures >= FAILING_AFTER


def alert_due(now_s: float, last_success_s: float, alert_after_s: float,
              alerting: bool) -> bool:
    """No successful fetch for alert_after_s, not yet alerted: raise the alert (once)."""
    return not alerting and now_s - last_success_s >= alert_after_s


def pending_uids(found: Sequence[int], last_uid: int) -> list[int]:
    """UIDs still to import, ascending.

    `UID SEARCH UID n:*` always matches the highest UID even when it is below n (RFC 3501
    6.4.8: "*" is the largest UID in use, and n:* is the same set as *:n), so filter.
    """
    return sorted({uid for uid in found if uid > last_uid})


def batches(uids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(uids), size):
        yield list(uids[start:start + size])


def uid_set(uids: Sequence[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1:3,7,9:10" (RFC 3501 sequence-set)."""
    parts: list[str] = []
    ordered = sorted(set(uids))
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[index], ordered[end]
        parts.append(str(first) if first == last else f"{first}:{last}")
        index = end + 1
    return ",".join(parts)


def backoff_delay(attempt: int, base_s: float = 1.0, cap_s: float = 300.0,
                  rand: Callable[[], float] = lambda: 0.5) -> float:
    """Exponential backoff with jitter: attempt 1 waits ~base, doubling up to cap.

    Half of the delay is fixed, half random ("equal jitter"), so many deskgate instances
    or mailboxes failing together do not reconnect in lock step.
    """
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


def progress_due(done: int, total: int, every: int) -> bool:
    """A first import logs a progress line every `every` mails and at the end."""
    return total > every and (done % every == 0 or done == total)


def envelope_sender(raw: bytes) -> str | None:
    """The envelope sender the delivering MTA recorded in Return-Path (RFC 5321 4.4).

    "" for the null reverse-path <> (bounces), None when there is no Return-Path.
    """
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    value = BytesHeaderParser().parsebytes(head + b"\r\n\r\n").get("Return-Path")
    if value is None:
        return None
    if str(value).strip() in ("<>", ""):
        return ""
    return parseaddr(str(value))[1] or None


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_try_advisory_lock, the same on every instance."""
    digest = hashlib.sha256(f"deskgate.imap:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# aioimaplib strips "* SEARCH" from the untagged answer; accept the line with or without it.
_SEARCH = re.compile(rb"^(?:SEARCH\b)?(?P<uids>[\d ]*)$")
_UID = re.compile(rb"\bUID (?P<uid>\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (?P<value>\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (?P<value>\d+)\]")
_EXISTS = re.compile(rb"^(?P<value>\d+) EXISTS")
_SIZE = re.compile(rb"\bRFC822\.SIZE (?P<size>\d+)")


def parse_search(lines: Sequence[bytes | bytearray]) -> list[int]:
    uids: list[int] = []
    for line in lines:
        match = _SEARCH.match(bytes(line))
        if match:
            uids += [int(u) for u in match.group("uids").split()]
    return uids


def parse_uidvalidity(lines: Sequence[bytes | bytearray]) -> int | None:
    for line in lines:
        match = _UIDVALIDITY.search(bytes(line))
        if match:
            return int(match.group("value"))
    return None


def parse_fetch(lines: Sequence[bytes | bytearray]) -> list[tuple[int, bytes]]:
    """(uid, raw) pairs from a `UID FETCH … (UID BODY.PEEK[])` response as aioimaplib gives it.

    Each message is a header line ending in a literal `{n}` (`7 FETCH (UID 12 BODY[] {n}`),
    the literal itself as a bytearray, then the rest of the item (`)` or ` UID 12)`): the
    UID can come before or after the body, RFC 3501 7.4.2 leaves the order to the server.
    """
    found: list[tuple[int, bytes]] = []
    uid: int | None = None
    body: bytes | None = None
    for line in lines:
        if isinstance(line, bytearray):
            body = bytes(line)
            continue
        if re.match(rb"^\d+ FETCH \(", line):
            uid, body = None, None
        match = _UID.search(line)
        if match:
            uid = int(match.group("uid"))
        if uid is not None and body is not None:
            found.append((uid, body))
            uid, body = None, None
    return found
