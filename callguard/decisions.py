"""What callguard answers a PBX: the reasons of CONTRACT.md and one decision type."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    OK = "OK"
    NO_FUNDS = "NO_FUNDS"
    BLOCKED = "BLOCKED"
    CHANNEL_LIMIT = "CHANNEL_LIMIT"
    DEST_BLOCKED = "DEST_BLOCKED"
    NO_RATE = "NO_RATE"
    UNKNOWN_ACCOUNT = "UNKNOWN_ACCOUNT"
    RATE_LIMIT = "RATE_LIMIT"
    VELOCITY_LIMIT = "VELOCITY_LIMIT"
    BAD_REQUEST = "BAD_REQUEST"
    UNAVAILABLE = "UNAVAILABLE"


# Q.850 causes for a denied call, so the caller hears something fitting.
HANGUP_CAUSE = {
    Reason.NO_FUNDS: 21,  # call rejected
    Reason.BLOCKED: 21,
    Reason.CHANNEL_LIMIT: 34,  # no circuit/channel available
    Reason.DEST_BLOCKED: 21,
    Reason.NO_RATE: 1,  # unallocated number: we do not route there
    Reason.UNKNOWN_ACCOUNT: 21,
    Reason.RATE_LIMIT: 34,
    Reason.VELOCITY_LIMIT: 21,
    Reason.BAD_REQUEST: 111,  # protocol error
    Reason.UNAVAILABLE: 41,  # temporary failure
}
# Cause for a call cut off because its money ran out: normal clearing, as a
# PBX that ends a call on a timeout also reports it.
CUTOFF_CAUSE = 16


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to authorize (and, with allow=False for final, to extend)."""

    allow: bool
    reason: Reason
    session: str = ""
    grant: int = 0  # seconds of the current slice, counted from answer
    grant_end_ms: int = 0  # epoch ms when the grant runs out (0 before answer)
    final: bool = False  # no more slices will be granted
    maxsec: int = 0  # seconds the account could pay now if this were its only call
    # Seconds from now the PBX may keep an allowed call if it never hears from us again
    # (its own dead man's switch at setup), 0 for a deny.
    deadline: int = 0
    hold: int = 0  # micro-units Redis holds for the call now (the process's metrics)

    @property
    def result(self) -> str:
        return "ALLOW" if self.allow else "DENY"

    def channel_variables(self) -> list[tuple[str, str]]:
        """The CONTRACT.md variables, in the order the dialplan reads them."""
        return [
            ("CALLGUARD_RESULT", self.result),
            ("CALLGUARD_REASON", self.reason.value),
            ("CALLGUARD_GRANT", str(self.grant)),
            ("CALLGUARD_MAXSEC", str(self.maxsec)),
            ("CALLGUARD_SESSION", self.session),
        ]


def denied(reason: Reason, session: str = "") -> Decision:
    return Decision(False, reason, session)


def unavailable(policy: str, fail_open_grant: int, grace: int) -> Decision:
    """The answer when Redis cannot decide in time (DESIGN.md, failure policy)."""
    if policy == "fail_open":
        # A short fixed grant, final: only the PBX's own timeout ends the call, ringing
        # included.
        return Decision(True, Reason.UNAVAILABLE, "", fail_open_grant, 0, True,
                        deadline=fail_open_grant + grace)
    return denied(Reason.UNAVAILABLE)
