"""SMTP replies as named constants carrying their code (RFC 5321 4.2, RFC 3463 enhanced codes)."""

R250_OK = "250 2.0.0 OK"
R250_DUPLICATE = "250 2.0.0 OK: already received"
R250_QUARANTINED = "250 2.0.0 OK: kept for review"
R421_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
R451_TEMPORARY = "451 4.3.0 Temporary failure, please try again later"
R550_NO_SUCH_ADDRESS = "550 5.1.1 No such mailbox here"
R552_TOO_BIG = "552 5.3.4 Message exceeds the size limit"
R554_RELAY_DENIED = "554 5.7.1 Relay access denied"
R550_NOT_ALLOWED = "550 5.7.1 Not allowed"  # an agent acting outside their rights: + reason
# Submission port (agents, issue 6; RFC 4954 for AUTH).
R235_AUTH_OK = "235 2.7.0 Authentication successful"
R454_AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure, please try again later"
R530_AUTH_REQUIRED = "530 5.7.0 Authentication required"
R530_STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
R535_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
# Abuse limits of the inbound port (issue 11).
R421_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
R421_TIMEOUT = "421 4.4.2 Timeout, closing the connection"
R452_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
R500_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"


def stored(ticket_number: int | None) -> str:
    return f"{R250_OK}: ticket {ticket_number}" if ticket_number else R250_OK


def locked_out(seconds: float) -> str:
    """While too many failed logins lock the address or the client IP (temporary: 454)."""
    return (f"454 4.7.0 Too many failed logins from this address or client; "
            f"try again in {_minutes(seconds)}")


def auth_failed_and_locked(seconds: float) -> str:
    """The failure that reaches the limit: still 535, saying what happens next."""
    return f"{R535_AUTH_FAILED}; too many failed logins, locked for {_minutes(seconds)}"


def _minutes(seconds: float) -> str:
    minutes = max(1, -(-int(seconds) // 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def not_your_address(own: str) -> str:
    return f"553 5.7.1 Agents may only send as themselves: use MAIL FROM:<{own}>"


def rate_limited(kind: str) -> str:
    """Over a sending rate (issue 11): temporary, the MTA retries later (DESIGN 4 says 450;
    the issue asks 451 — 451 it is, both are 4xx and read the same by MTAs)."""
    what = {"sender": "sender", "domain": "sender domain", "ip": "client"}.get(kind, kind)
    return f"451 4.7.1 Too many mails from this {what}, try again later"
