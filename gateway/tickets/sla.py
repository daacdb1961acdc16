"""Business time: due dates that skip nights, weekends and holidays, in the department's zone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MIDNIGHT = time(0, 0)
# Far enough for any target; a calendar with no open hour at all must not loop forever.
_HORIZON_DAYS = 3 * 366


@dataclass(frozen=True, slots=True)
class BusinessHours:
    """Weekly opening ranges (Monday first) in a time zone, minus holidays; or 24x7."""

    timezone: str = "UTC"
    weekly: tuple[tuple[tuple[time, time], ...], ...] = field(default=((),) * 7)
    holidays: frozenset[date] = frozenset()
    always_open: bool = False

    @classmethod
    def twenty_four_seven(cls, timezone: str = "UTC") -> BusinessHours:
        return cls(timezone=timezone, always_open=True)


@dataclass(frozen=True, slots=True)
class SlaTarget:
    first_response: timedelta | None
    resolution: timedelta | None


def parse_range(text: str) -> tuple[time, time]:
    """'09:00-18:00'; an end at or before the start spans midnight ('22:00-02:00')."""
    start, sep, end = text.partition("-")
    try:
        if not sep or len(start.strip()) != 5:
            raise ValueError
        first, last = time.fromisoformat(start.strip()), _end_time(end.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a range like 09:00-18:00") from None
    if first == last and last != _MIDNIGHT:
        raise ValueError(f"{text!r} is empty")
    return first, last


def _end_time(text: str) -> time:
    return _MIDNIGHT if text == "24:00" else time.fromisoformat(text)


def _at(day: date, moment: time, zone: ZoneInfo) -> datetime:
    # fold=0: a wall time that exists twice (autumn DST) means the first one; a wall time
    # that does not exist (spring) resolves to the instant after the gap when converted.
    return datetime.combine(day, moment, tzinfo=zone).astimezone(UTC)


def _open_intervals(day: date, hours: BusinessHours, zone: ZoneInfo
                    ) -> Iterator[tuple[datetime, datetime]]:
    """The open intervals that start on this local day, in UTC, in order."""
    if day in hours.holidays:
        return
    for start, end in hours.weekly[day.weekday()]:
        next_day = day + timedelta(days=1)
        end_day = next_day if end <= start else day  # spans midnight, or ends at 24:00
        yield _at(day, start, zone), _at(end_day, end, zone)


def add_business_time(start: datetime, duration: timedelta, hours: BusinessHours) -> datetime:
    """The instant when `duration` of open time has passed after `start`."""
    if hours.always_open:
        return start + duration
    zone = ZoneInfo(hours.timezone)
    remaining = duration
    day = start.astimezone(zone).date() - timedelta(days=1)  # a range from yesterday may span
    for _ in range(_HORIZON_DAYS):
        for opens, closes in _open_intervals(day, hours, zone):
            begin = max(opens, start)
            if begin >= closes:
                continue
            if begin + remaining <= closes:
                return begin + remaining
            remaining -= closes - begin
        day += timedelta(days=1)
    raise ValueError("the business hours have no open time within three years")


def business_time_between(start: datetime, end: datetime, hours: BusinessHours) -> timedelta:
    """Open time between two instants (zero when end is not after start)."""
    if end <= start:
        return timedelta(0)
    if hours.always_open:
        return end - start
    zone = ZoneInfo(hours.timezone)
    total = timedelta(0)
    day = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date()
    while day <= last:
        for opens, closes in _open_intervals(day, hours, zone):
            overlap = min(closes, end) - max(opens, start)
            if overlap > timedelta(0):
                total += overlap
        day += timedelta(days=1)
    return total


@dataclass(frozen=True, slots=True)
class DueDates:
    first_response_due_at: datetime | None
    due_at: datetime | None


def due_dates(created_at: datetime, target: SlaTarget | None, hours: BusinessHours) -> DueDates:
    if target is None:
        return DueDates(None, None)
    return DueDates(
        add_business_time(created_at, target.first_response, hours)
        if target.first_response else None,
        add_business_time(created_at, target.resolution, hours) if target.resolution else None)


def shift_for_pause(due_at: datetime | None, paused_from: datetime, resumed_at: datetime,
                    hours: BusinessHours) -> datetime | None:
    """Moving a due date by the open time a ticket spent On Hold / Waiting on customer."""
    if due_at is None:
        return None
    return add_business_time(due_at, business_time_between(paused_from, resumed_at, hours),
                             hours)


PAUSING_STATUSES = frozenset({"on_hold", "waiting_on_customer"})


@dataclass(frozen=True, slots=True)
class SlaClock:
    first_response_due_at: datetime | None
    due_at: datetime | None
    paused_at: datetime | None


def on_status_change(clock: SlaClock, old: str, new: str, now: datetime, hours: BusinessHours,
                     pause_when_waiting: bool) -> SlaClock:
    """Entering On Hold / Waiting stops the clock; leaving it moves the due dates on."""
    if not pause_when_waiting:
        return clock
    if new in PAUSING_STATUSES and old not in PAUSING_STATUSES:
        return SlaClock(clock.first_response_due_at, clock.due_at, now)
    if old in PAUSING_STATUSES and new not in PAUSING_STATUSES and clock.paused_at:
        return SlaClock(shift_for_pause(clock.first_response_due_at, clock.paused_at, now, hours),
                        shift_for_pause(clock.due_at, clock.paused_at, now, hours), None)
    return clock


def target_outcome(done_at: datetime | None, due_at: datetime | None, now: datetime
                   ) -> str | None:
    """met / breached / pending for one SLA target; None when the ticket had no target."""
    if due_at is None:
        return None
    if done_at is not None:
        return "met" if done_at <= due_at else "breached"
    return "breached" if now > due_at else "pending"


def is_open(moment: datetime, hours: BusinessHours) -> bool:
    """Inside business hours at this instant (rules match on it)."""
    if hours.always_open:
        return True
    zone = ZoneInfo(hours.timezone)
    day = moment.astimezone(zone).date()
    return any(opens <= moment < closes
               for d in (day - timedelta(days=1), day)
               for opens, closes in _open_intervals(d, hours, zone))
