"""What the HTTP API takes and gives, as the OpenAPI document describes it. Requests are
strict (no unknown field, no "5" for 5); money is a decimal string both ways, checked by
the same parser as the CLI's, so a refusal reads the same."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.core import ACCOUNT_ID

# In: "20", "20.00", "0.000205" (money.parse_amount says what is refused and why).
AmountIn = Annotated[str, Field(max_length=40, examples=["20.00"])]
# Out: full precision, six decimals.
Money = Annotated[str, Field(pattern=r"^-?[0-9]+\.[0-9]{6}$", examples=["50.000000"])]
Time = Annotated[str, Field(description="ISO 8601 UTC, milliseconds", examples=[
    "2026-12-01T21:18:00.000Z"])]
AccountId = Annotated[str, Field(pattern=f"^{ACCOUNT_ID.pattern}$", examples=["41441234567"])]
Reason = Annotated[str, Field(min_length=1, max_length=200, description=(
    "Why: recorded in the books with the token's name."))]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AccountCreate(Request):
    account: AccountId
    kind: Literal["prepaid", "postpaid"]
    balance: AmountIn | None = Field(None, description="Opening balance (prepaid).")
    credit_limit: AmountIn | None = Field(None, description="Credit limit (postpaid).")
    warn_below: AmountIn | None = None
    warn_at: AmountIn | None = None
    currency: Annotated[str, Field(pattern=r"^[A-Za-z]{3}$")] = "CHF"
    max_channels: Annotated[int, Field(ge=0, le=100000)] = 10
    cps_limit: Annotated[int, Field(ge=0, le=10000)] = 0
    plan: Annotated[str, Field(max_length=64)] | None = None
    email: Annotated[str, Field(max_length=254)] | None = None


# What a customer's own token may change; the rest is the operator's to decide.
CUSTOMER_FIELDS = frozenset({"warn_below", "warn_at", "email", "payment_method",
                             "auto_topup_below", "auto_topup_amount", "auto_topup"})


class AccountChange(Request):
    """Only the fields given change. `auto_topup: false` stops topping up by card."""

    max_channels: Annotated[int, Field(ge=0, le=100000)] | None = None
    cps_limit: Annotated[int, Field(ge=0, le=10000)] | None = None
    warn_below: AmountIn | None = None
    credit_limit: AmountIn | None = None
    warn_at: AmountIn | None = None
    plan: Annotated[str, Field(max_length=64)] | None = None
    email: Annotated[str, Field(max_length=254)] | None = None
    payment_method: Annotated[str, Field(max_length=200)] | None = None
    auto_topup_below: AmountIn | None = None
    auto_topup_amount: AmountIn | None = None
    auto_topup: Literal[False] | None = None
    max_calls_per_minute: Annotated[int, Field(ge=0, le=100000)] | None = None
    max_spend_per_hour: AmountIn | None = None
    block_prefixes: Annotated[list[Annotated[str, Field(max_length=32)]],
                              Field(max_length=100)] = []
    unblock_prefixes: Annotated[list[Annotated[str, Field(max_length=32)]],
                                Field(max_length=100)] = []
    on_fraud: Literal["notify", "block"] | None = None
    reason: Reason | None = None


class Movement(Request):
    amount: AmountIn
    reason: Reason | None = None


class Block(Request):
    reason: Annotated[str, Field(min_length=1, max_length=200, description=(
        "The account's block reason, recorded with the token's name."))] = \
        "blocked by operator"
    hangup: bool = Field(False, description="Also end the account's calls in progress.")


class Unblock(Request):
    reason: Reason | None = None


class AutoTopup(BaseModel):
    below: Money
    amount: Money
    payment_method: str


class Call(BaseModel):
    session: str
    account: str
    direction: Literal["outbound", "inbound"]
    destination: str
    node: str
    state: Literal["ringing", "talking", "ending"]
    answered_at: Time | None
    answered_for: int = Field(description="Seconds talked so far.")
    granted_until: int | None = Field(description="Grant end, Unix seconds.")
    grant_end: Time | None
    granted_seconds: int
    left_seconds: int | None
    cost_so_far: Money
    reserved: Money


class Account(BaseModel):
    account: str
    kind: Literal["prepaid", "postpaid"]
    currency: str
    status: Literal["active", "blocked"]
    block_reason: str | None
    plan: str
    balance: Money
    credit_limit: Money
    outstanding: Money
    reserved: Money
    available: Money
    channels: int
    max_channels: int
    cps_limit: int
    limit_state: Literal["ok", "warned", "exhausted"]
    warn_below: Money | None
    warn_at: Money | None
    email: str | None
    auto_topup: AutoTopup | None
    max_calls_per_minute: int
    max_spend_per_hour: Money | None
    blocked_prefixes: list[str]
    on_fraud: Literal["notify", "block"]


SettingValue = str | int | None


class Change(BaseModel):
    old: SettingValue
    new: SettingValue


class Action(BaseModel):
    """Who did what to an account and why (money movements are ledger entries)."""

    id: int
    at: Time
    actor: str = Field(description="`api:<token name>`; the OS user for the CLI (and the "
                                   "one sudo names); `callguard:...` for automatic ones.")
    action: Literal["create", "change", "block", "unblock", "kill"]
    reason: str | None
    session: str | None = Field(description="The call a kill hung up.")
    changes: dict[str, Change] = Field(description="Settings changed, old and new values.")


class AccountLive(Account):
    live_calls: list[Call]
    blocked_by: Action | None = Field(description="The block it is under; null: not blocked "
                                                  "(or blocked before actions were "
                                                  "recorded).")
    recent_actions: list[Action] = Field(description="The latest operator actions, newest "
                                                     "first.")


class Blocked(Account):
    hung_up: int | None = Field(description="Calls hung up; null while Redis is away (they "
                                            "go on until Redis has the block).")


class Booked(BaseModel):
    entry: int
    account: str
    kind: Literal["topup", "payment", "adjustment"]
    amount: Money
    created: bool = Field(description="False: this Idempotency-Key was booked before; "
                                      "nothing changed.")
    actor: str | None = Field(description="Who booked the entry (on a repeat, the first "
                                          "booking's).")
    reason: str | None
    in_redis: bool = Field(description="False: booked; Redis takes it when it is back.")


class Cdr(BaseModel):
    session: str
    account: str
    direction: str
    destination: str
    prefix: str
    setup: Time
    answer: Time | None
    end: Time
    duration: int
    billed: int
    rate_per_min: Money
    connect_fee: Money
    cost: Money
    cause: str
    node: str


class LedgerEntry(BaseModel):
    entry: int
    at: Time
    kind: Literal["topup", "payment", "call_charge", "adjustment"]
    amount: Money
    balance: Money
    reference: str | None
    session: str | None
    actor: str | None = Field(description="Who booked it; null: booked before callguard "
                                          "recorded it.")
    reason: str | None


class Notice(BaseModel):
    id: str
    seq: int
    account: str
    type: str
    at: str
    state: Literal["pending", "retrying", "sent", "failed", "kept"]
    attempts: int
    next_attempt_at: str | None
    last_error: str | None
    mail_sent_at: str | None
    webhook_sent_at: str | None
    sent_at: str | None
    failed_at: str | None


class Hangup(BaseModel):
    session: str
    listeners: int = Field(description="serve processes that took the request.")


def page(item: type[BaseModel], name: str) -> type[BaseModel]:
    """A page of items, and the cursor of the next one (null: the last)."""
    return type(name, (BaseModel,), {"__annotations__": {"items": list[item],
                                                         "next": str | None}})


AccountPage = page(Account, "AccountPage")
CdrPage = page(Cdr, "CdrPage")
LedgerPage = page(LedgerEntry, "LedgerPage")
ActionPage = page(Action, "ActionPage")
NoticePage = page(Notice, "NoticePage")


class ProblemDetail(BaseModel):
    """RFC 9457. `detail` is the line the CLI prints for the same refusal."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict] | None = None
