"""SMTP replies as named constants carrying their code (RFC 5321 4.2, RFC 3463 enhanced codes)."""

R250_OK = "250 2.0.0 OK"
R250_DUPLICATE = "250 2.0.0 OK: already received"
R250_QUARANTINED = "250 2.0.0 OK: kept for review"
R421_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
R451_TEMPORARY = "451 4.3.0 Temporary failure, please try again later"
R550_NO_SUCH_ADDRESS = "550 5.1.1 No such mailbox here"
R552_TOO_BIG = "552 5.3.4 Message exceeds the size limit"
R554_RELAY_DENIED = "554 5.7.1 Relay access denied"


def stored(ticket_number: int | None) -> str:
    return f"{R250_OK}: ticket {ticket_number}" if ticket_number else R250_OK
