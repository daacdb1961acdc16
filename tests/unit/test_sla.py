"""Business-time arithmetic: weekends, holidays, DST, ranges across midnight, 24x7."""

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway.tickets.sla import (
    BusinessHours,
    SlaTarget,
    add_business_time,
    business_time_between,
    due_dates,
    parse_range,
    shift_for_pause,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
NINE_TO_SIX = ((time(9), time(18)),)
WEEKDAYS_9_18 = (NINE_TO_SIX,) * 5 + ((), ())


def hours(zone: str = "Europe/Berlin", weekly=WEEKDAYS_9_18, holidays=()) -> BusinessHours:
    return BusinessHours(timezone=zone, weekly=weekly, holidays=frozenset(holidays))


def local(zone: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=zone)


def test_friday_evening_one_hour_target_is_due_monday_morning() -> None:
    created = local(BERLIN, 2026, 11, 20, 17, 55)  # a Friday
    due = add_business_time(created, timedelta(hours=1), hours())
    assert due.astimezone(BERLIN) == local(BERLIN, 2026, 11, 23, 9, 55)


def test_mail_at_night_starts_counting_at_opening() -> None:
    due = add_business_time(local(BERLIN, 2026, 11, 24, 2, 0), timedelta(minutes=30), hours())
    assert due.astimezone(BERLIN) == local(BERLIN, 2026, 11, 24, 9, 30)


def test_several_ranges_a_day_skip_the_lunch_break() -> None:
    split = (((time(9), time(12)), (time(13), time(17))),) * 5 + ((), ())
    due = add_business_time(local(BERLIN, 2026, 11, 24, 11, 30), timedelta(hours=1),
                            hours(weekly=split))
    assert due.astimezone(BERLIN) == local(BERLIN, 2026, 11, 24, 13, 30)


def test_holidays_are_skipped() -> None:
    christmas = hours(holidays=(date(2026, 12, 24), date(2026, 12, 25)))
    due = add_business_time(local(BERLIN, 2026, 12, 23, 17, 0), timedelta(hours=2), christmas)
    assert due.astimezone(BERLIN) == local(BERLIN, 2026, 12, 28, 10, 0)


@pytest.mark.parametrize(("zone", "day"), [(BERLIN, (2026, 3, 29)), (NEW_YORK, (2026, 3, 8))])
def test_spring_forward_night_does_not_shift_opening(zone: ZoneInfo, day: tuple[int, int, int]
                                                     ) -> None:
    every_day = (NINE_TO_SIX,) * 7
    start = local(zone, *day, 0, 30)  # the night the clocks jump
    due = add_business_time(start, timedelta(hours=1), hours(str(zone), every_day))
    assert due.astimezone(zone) == local(zone, *day, 10, 0)


def test_autumn_back_night_shift_counts_real_time() -> None:
    night = (((time(22), time(6)),),) * 7  # a night shift that spans midnight
    start = local(BERLIN, 2026, 10, 24, 22, 0)  # the night of 25 October has 25 hours
    due = add_business_time(start, timedelta(hours=8), hours(weekly=night))
    assert due.astimezone(BERLIN) == local(BERLIN, 2026, 10, 25, 5, 0)
    assert business_time_between(start, due, hours(weekly=night)) == timedelta(hours=8)


def test_range_across_midnight_belongs_to_the_day_it_starts() -> None:
    friday_night = ((), (), (), (), ((time(22), time(2)),), (), ())
    start = local(NEW_YORK, 2026, 11, 20, 23, 0)  # Friday 23:00: 3 h left tonight, 1 h next week
    due = add_business_time(start, timedelta(hours=4), hours("America/New_York", friday_night))
    assert due.astimezone(NEW_YORK) == local(NEW_YORK, 2026, 11, 27, 23, 0)


def test_twenty_four_seven_is_plain_elapsed_time() -> None:
    start = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
    assert add_business_time(start, timedelta(hours=5), BusinessHours.twenty_four_seven()) == \
        start + timedelta(hours=5)


def test_business_time_between_counts_only_open_hours() -> None:
    friday = local(BERLIN, 2026, 11, 20, 17, 0)
    monday = local(BERLIN, 2026, 11, 23, 10, 0)
    assert business_time_between(friday, monday, hours()) == timedelta(hours=2)
    assert business_time_between(monday, friday, hours()) == timedelta(0)


def test_pause_moves_the_due_date_by_the_open_time_spent_waiting() -> None:
    due = local(BERLIN, 2026, 11, 24, 12, 0)
    paused, resumed = local(BERLIN, 2026, 11, 23, 17, 0), local(BERLIN, 2026, 11, 24, 10, 0)
    moved = shift_for_pause(due, paused, resumed, hours())  # 1 h Monday + 1 h Tuesday
    assert moved is not None and moved.astimezone(BERLIN) == local(BERLIN, 2026, 11, 24, 14, 0)


def test_due_dates_for_a_target() -> None:
    created = local(BERLIN, 2026, 11, 23, 9, 0)
    dates = due_dates(created, SlaTarget(timedelta(hours=1), timedelta(hours=16)), hours())
    assert dates.first_response_due_at == local(BERLIN, 2026, 11, 23, 10, 0)
    assert dates.due_at == local(BERLIN, 2026, 11, 24, 16, 0)
    assert due_dates(created, None, hours()).due_at is None


def test_a_calendar_without_open_time_is_an_error_not_a_hang() -> None:
    with pytest.raises(ValueError, match="no open time"):
        add_business_time(local(BERLIN, 2026, 1, 1, 0, 0), timedelta(hours=1),
                          hours(weekly=((),) * 7))


@pytest.mark.parametrize(("text", "expected"), [
    ("09:00-18:00", (time(9), time(18))), ("22:00-02:00", (time(22), time(2))),
    ("00:00-24:00", (time(0), time(0)))])
def test_parse_range(text: str, expected: tuple[time, time]) -> None:
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["9-18", "09:00", "10:00-10:00"])
def test_parse_range_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_range(text)


def test_target_outcome() -> None:
    from gateway.tickets.sla import target_outcome

    due = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    assert target_outcome(due - timedelta(minutes=1), due, due) == "met"
    assert target_outcome(due + timedelta(minutes=1), due, due) == "breached"
    assert target_outcome(None, due, due + timedelta(seconds=1)) == "breached"
    assert target_outcome(None, due, due - timedelta(seconds=1)) == "pending"
    assert target_outcome(None, None, due) is None
