"""The quota engine's rules, free of I/O.

Each operation is built here as a `Call` (a Lua script, its keys and its
arguments, and how to read the reply). `SyncEngine` (gevent, CLI, worker) and
`AsyncEngine` (asyncio adapters) only execute Calls, so no rule exists twice.
All keys of one script share the account's hash tag `{ACCT}`: one slot, safe on
Redis Cluster.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..decisions import Decision, Reason, denied
from ..rating import FREE_RATE, NumberError, RatePlan, normalize_number

LUA = Path(__file__).with_name("lua")
SCRIPTS = ("authorize", "answer", "extend", "commit", "credit")
ACCOUNT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
DIRECTIONS = ("outbound", "inbound")
MAX_CHANNEL_ID = 200
MARKER_TTL = 90 * 86400  # a movement retried within 90 days is still recognised
COMMIT_MODES = {"reported": 0, "stale": 1, "gone": 2}


def script_sources() -> dict[str, str]:
    common = (LUA / "common.lua").read_text()
    return {name: common + "\n" + (LUA / f"{name}.lua").read_text() for name in SCRIPTS}


def valid_account(account: str) -> bool:
    return isinstance(account, str) and ACCOUNT_ID.fullmatch(account) is not None


def session_id(account: str, channel: str) -> str:
    return f"{account}/{channel}"


def split_session(session: str) -> tuple[str, str]:
    """(account, channel) of a session id; ValueError if it is not one."""
    account, sep, channel = session.partition("/")
    if not sep or not channel or not valid_account(account):
        raise ValueError(f"not a session id: {session!r}")
    return account, channel


class Keys:
    """Key names. `prefix` separates installations (and tests) on one Redis."""

    def __init__(self, prefix: str = "cg"):
        self.prefix = prefix
        self.accounts = f"{prefix}:accounts"  # set of account ids, written by the CLI only
        self.plans_channel = f"{prefix}:plans"  # pub/sub: a plan changed
        self.plans_version = f"{prefix}:plans:version"
        self.kill_channel = f"{prefix}:kill"  # pub/sub: end these sessions now

    def account(self, a: str) -> str:
        return f"{self.prefix}:{{{a}}}:acct"

    def session(self, a: str, channel: str) -> str:
        return f"{self.prefix}:{{{a}}}:s:{channel}"

    def live(self, a: str) -> str:
        return f"{self.prefix}:{{{a}}}:live"

    def events(self, a: str) -> str:
        return f"{self.prefix}:{{{a}}}:ev"

    def marker(self, a: str, key: str) -> str:
        return f"{self.prefix}:{{{a}}}:mv:{key}"

    def call_keys(self, a: str, channel: str) -> list[str]:
        return [self.account(a), self.session(a, channel), self.live(a), self.events(a)]


@dataclass(frozen=True, slots=True)
class Call:
    script: str
    keys: list[str]
    args: list
    parse: Callable  # reply -> result, or another Call to run next


@dataclass(frozen=True, slots=True)
class Grant:
    """State of a session after answer or extend."""

    state: str  # 'ans' (running), 'auth' (not answered), 'done', 'deny', 'unknown'
    grant: int  # seconds granted from answer
    grant_end_ms: int
    final: bool
    now_ms: int  # the clock the script used: schedule from it, not from the local clock

    @property
    def left_ms(self) -> int:
        return self.grant_end_ms - self.now_ms

    @property
    def live(self) -> bool:
        return self.state == "ans"


@dataclass(frozen=True, slots=True)
class Charge:
    state: str  # 'done' (committed now), 'already', 'unknown', 'alive' (stale check failed)
    cost: int
    duration: int
    billed: int


class Plans:
    """Rate plans held in the process: call setup never asks SQL for a rate."""

    def __init__(self, plans: dict[tuple[str, str], RatePlan] | None = None):
        self.by_key = plans or {}
        self.account_plan: dict[str, str] = {}  # learned from Redis replies

    def replace(self, plans: dict[tuple[str, str], RatePlan]) -> None:
        self.by_key = plans

    def plan_for(self, account: str) -> str:
        return self.account_plan.get(account, "default")

    def rate(self, plan: str, direction: str, number: str):
        table = self.by_key.get((plan, direction))
        found = table.lookup(number) if table else None
        if found is None and direction == "inbound":
            return FREE_RATE  # incoming calls are free unless the plan prices them
        return found


class Ops:
    """Builds the engine's Calls."""

    def __init__(self, keys: Keys, plans: Plans, quota: int = 60, node: str = "",
                 ring_timeout: int = 600, stale_grace: int = 30):
        self.keys = keys
        self.plans = plans
        self.quota = quota
        self.node = node
        self.ring_timeout = ring_timeout
        self.stale_grace = stale_grace

    def authorize(self, account: str, destination: str, direction: str, channel: str,
                  now_ms: int | None = None) -> Call | Decision:
        """First slice of credit for a new call, or a Decision straight away for bad input."""
        if direction not in DIRECTIONS or not channel or len(channel) > MAX_CHANNEL_ID:
            return denied(Reason.BAD_REQUEST)
        if not valid_account(account):
            return denied(Reason.UNKNOWN_ACCOUNT if account else Reason.BAD_REQUEST)
        try:
            number = normalize_number(destination)
        except NumberError:
            return denied(Reason.BAD_REQUEST)
        return self._authorize(account, number, direction, channel, now_ms, retried=False)

    def _authorize(self, account, number, direction, channel, now_ms, retried) -> Call:
        plan = self.plans.plan_for(account)
        rate = self.plans.rate(plan, direction, number)
        sid = session_id(account, channel)
        args = [
            "" if now_ms is None else now_ms, sid, channel, direction, number, plan,
            0 if rate is None else 1,
            *((rate.prefix, rate.rate_per_min, rate.connect_fee, rate.initial_increment,
               rate.subsequent_increment, int(rate.blocked)) if rate else ("", 0, 0, 1, 1, 0)),
            self.quota, self.node, self.ring_timeout,
        ]

        def parse(reply):
            allow, reason, grant, grant_end, final, maxsec, extra = reply
            if reason == "PLAN":
                # The account uses another plan than we guessed: learn it, ask again.
                self.plans.account_plan[account] = extra
                if retried:
                    return denied(Reason.UNAVAILABLE, sid)
                return self._authorize(account, number, direction, channel, now_ms, True)
            self.plans.account_plan[account] = plan
            return Decision(bool(int(allow)), Reason(reason), sid if reason != "UNKNOWN_ACCOUNT"
                            else "", int(grant), int(grant_end), bool(int(final)), int(maxsec))

        return Call("authorize", self.keys.call_keys(account, channel), args, parse)

    def answer(self, session: str, now_ms: int | None = None) -> Call:
        account, channel = split_session(session)
        return Call("answer", self.keys.call_keys(account, channel),
                    ["" if now_ms is None else now_ms, channel, self.stale_grace], _grant)

    def extend(self, session: str, seen_grant: int, now_ms: int | None = None) -> Call:
        account, channel = split_session(session)
        return Call("extend", self.keys.call_keys(account, channel),
                    ["" if now_ms is None else now_ms, channel, self.quota, seen_grant,
                     self.stale_grace], _grant)

    def commit(self, session: str, cause: str = "", now_ms: int | None = None,
               mode: str = "reported") -> Call:
        """End a session. mode 'reported': the PBX said it ended now; 'stale': the PBX
        went silent past the deadline (sweeper); 'gone': the channel vanished while
        nobody watched (adapter restart). The last two charge up to the last grant."""
        account, channel = split_session(session)
        return Call("commit", self.keys.call_keys(account, channel),
                    ["" if now_ms is None else now_ms, channel, str(cause)[:32],
                     COMMIT_MODES[mode]], _charge)

    def release(self, session: str, now_ms: int | None = None) -> Call:
        """For a call that never started: frees its reservation and channel, charges nothing
        unless it was in fact answered."""
        return self.commit(session, "released", now_ms)

    def credit(self, account: str, amount: int, key: str) -> Call:
        return Call("credit", [self.keys.account(account), self.keys.marker(account, key)],
                    [amount, MARKER_TTL], lambda reply: (bool(reply[0]), int(reply[1])))


def _grant(reply) -> Grant:
    state, grant, grant_end, final, now = reply
    return Grant(state, int(grant), int(grant_end), bool(int(final)), int(now))


def _charge(reply) -> Charge:
    state, cost, duration, billed = reply
    return Charge(state, int(cost), int(duration), int(billed))
