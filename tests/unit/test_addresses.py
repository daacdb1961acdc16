"""Recipient routing and reply tokens: the decision handle_RCPT and ingest both use."""

from gateway.ingest.addresses import (
    Directory,
    RouteKind,
    find_tag,
    parse_reply_token,
    reply_address,
    reply_token,
    route_recipient,
    tag_pattern,
)

SECRET = b"unit-test-secret-0123456789"
DIRECTORY = Directory.from_departments(
    {"support": ("support@example.test",), "billing": ("billing@example.test",)}, SECRET)


def test_our_address_routes_to_its_department() -> None:
    route = route_recipient("<Support@Example.TEST>", DIRECTORY)
    assert (route.kind, route.department) == (RouteKind.DEPARTMENT, "support")


def test_our_idn_domain_routes_in_unicode_too() -> None:
    """SMTPUTF8 clients may name the domain in Unicode; our addresses are kept as A-labels."""
    directory = Directory.from_departments({"support": ("support@xn--exmple-cua.test",)},
                                           SECRET)
    for recipient in ("<support@exämple.test>", "support@xn--exmple-cua.test"):
        route = route_recipient(recipient, directory)
        assert (route.kind, route.address, route.department) == (
            RouteKind.DEPARTMENT, "support@xn--exmple-cua.test", "support")
    assert route_recipient("sales@exämple.test", directory).kind is RouteKind.UNKNOWN


def test_unknown_local_part_in_our_domain_is_unknown() -> None:
    assert route_recipient("sales@example.test", DIRECTORY).kind is RouteKind.UNKNOWN


def test_foreign_domain_is_a_relay_attempt() -> None:
    assert route_recipient("someone@elsewhere.example", DIRECTORY).kind is RouteKind.RELAY


def test_reply_token_routes_to_its_ticket() -> None:
    route = route_recipient(reply_address("billing@example.test", 42, SECRET), DIRECTORY)
    assert (route.kind, route.department, route.ticket_number) == (RouteKind.REPLY, "billing", 42)


def test_forged_token_is_plain_subaddressing() -> None:
    forged = reply_token(42, b"another-secret-entirely").replace("42", "43")
    route = route_recipient(f"support+{forged}@example.test", DIRECTORY)
    assert (route.kind, route.ticket_number) == (RouteKind.DEPARTMENT, None)


def test_token_with_changed_number_is_refused() -> None:
    token = reply_token(7, SECRET)
    assert parse_reply_token(token, SECRET) == 7
    assert parse_reply_token(token.replace("t7-", "t8-"), SECRET) is None


def test_unknown_base_with_plus_is_unknown() -> None:
    assert route_recipient("sales+x@example.test", DIRECTORY).kind is RouteKind.UNKNOWN


def test_address_without_domain_is_unknown() -> None:
    assert route_recipient("support", DIRECTORY).kind is RouteKind.UNKNOWN


def test_tag_is_found_with_a_custom_format() -> None:
    assert find_tag("Re: [#1234] Refund", tag_pattern("[#{number}]")) == 1234
    assert find_tag("AW: Ticket 77: Rechnung", tag_pattern("Ticket {number}:")) == 77
    assert find_tag("Re: Refund #12", tag_pattern("[#{number}]")) is None
