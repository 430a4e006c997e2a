"""The quota engine's rules, free of I/O.

Each operation is built here as a `Call` (a Lua script, its keys and its
arguments, and how to read the reply). `SyncEngine` (CLI, worker) and
`AsyncEngine` (the PBX adapters) only execute Calls, so no rule exists twice.

Key layout: accounts are spread over a fixed number of shards; every key of a
shard carries the shard's hash tag `{NN}`, so each script touches one Redis
Cluster slot, and the worker and the sweeper read one stream and one live set
per shard: their cost follows the calls, not the number of accounts.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..decisions import Decision, Reason, denied
from ..rating import FREE_RATE, NumberError, RatePlan, normalize_number

LUA = Path(__file__).with_name("lua")
SCRIPTS = ("authorize", "answer", "extend", "commit", "credit", "settings", "settle", "lease",
           "restore")
SHARDS = 64
LAYOUT = "2"  # Redis key layout version: refuse to run beside another one
ACCOUNT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# What Asterisk (Uniqueid, "[systemname-]1795236355.1310") and FreeSWITCH (a UUID) produce,
# with room to spare; the session id (account/channel/attempt) then fits every column,
# and so does the ledger key of its charge ("call:" + session id, String(200)).
CHANNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
DIRECTIONS = ("outbound", "inbound")
COMMIT_MODES = ("reported", "stale", "gone", "release")
MAX_TALK_MS = 1_000_000_000  # 11.5 days, as MAX_SECONDS in common.lua


def script_sources() -> dict[str, str]:
    common = (LUA / "common.lua").read_text()
    return {name: with_common(common, (LUA / f"{name}.lua").read_text()) for name in SCRIPTS}


_DEFINITION = re.compile(r"local (?:function )?([\w, ]+)")
_NAME = re.compile(r"[A-Za-z_]\w*")
_COMMENT_LINE = re.compile(r"^\s*--.*$", re.M)


def _names(lua: str) -> set[str]:
    """Every name in `lua` (strings and trailing comments too), lines of comment aside."""
    return set(_NAME.findall(_COMMENT_LINE.sub("", lua)))


def with_common(common: str, script: str) -> str:
    """common.lua and then `script`, keeping of common.lua only the definitions the script
    uses, itself or through another: every call of a script runs all of its text, and each
    function of common.lua built costs Redis some hundreds of instructions. A top-level
    `local` line starts a definition (it runs to the next one); those left out become blank
    lines, so line numbers (as in error messages) stay the same."""
    blocks: list[tuple[set[str], list[str]]] = [(set(), [])]  # the header: always kept
    for line in common.split("\n"):
        if line.startswith("local "):
            names = _DEFINITION.match(line).group(1).split(",")
            blocks.append(({n.strip() for n in names}, []))
        blocks[-1][1].append(line)
    wanted = _names(script)
    kept = [False] * len(blocks)
    kept[0] = True
    changed = True
    while changed:  # what a kept definition names is wanted too
        changed = False
        for k, (names, lines) in enumerate(blocks):
            if not kept[k] and names & wanted:
                kept[k] = changed = True
                wanted |= _names("\n".join(lines))
    text = "\n".join(line if keep else "" for (_, lines), keep in zip(blocks, kept, strict=True)
                     for line in lines)
    return text + "\n" + script


def valid_account(account: str) -> bool:
    return isinstance(account, str) and ACCOUNT_ID.fullmatch(account) is not None


def valid_channel(channel: str) -> bool:
    return isinstance(channel, str) and CHANNEL_ID.fullmatch(channel) is not None


def shard_of(account: str) -> int:
    return zlib.crc32(account.encode()) % SHARDS


@dataclass(frozen=True, slots=True)
class SessionId:
    """`ACCOUNT/CHANNEL/N`: the Nth call authorised in the account's shard, on that channel."""

    account: str
    channel: str
    n: str

    @classmethod
    def parse(cls, text: str) -> SessionId:
        parts = text.split("/") if isinstance(text, str) else []
        if (len(parts) != 3 or not valid_account(parts[0]) or not valid_channel(parts[1])
                or not parts[2].isdigit()):
            raise ValueError(f"not a session id: {text!r}")
        return cls(*parts)

    @property
    def member(self) -> str:
        """The session's name in its shard's live set (one current call per channel)."""
        return f"{self.account}/{self.channel}"

    def __str__(self) -> str:
        return f"{self.account}/{self.channel}/{self.n}"


class Keys:
    """Key names. `prefix` separates installations (and tests) on one Redis."""

    def __init__(self, prefix: str = "cg"):
        self.prefix = prefix
        self.accounts = f"{prefix}:accounts"  # set of account ids, written by the CLI only
        self.layout = f"{prefix}:layout"
        self.plans_channel = f"{prefix}:plans"  # pub/sub: a plan changed
        self.plans_version = f"{prefix}:plans:version"
        self.kill_channel = f"{prefix}:kill"  # pub/sub: end these sessions now
        self._tags = [f"{prefix}:{{{n:02d}}}" for n in range(SHARDS)]

    def tag(self, account: str) -> str:
        return self._tags[shard_of(account)]

    def account(self, a: str) -> str:
        return f"{self.tag(a)}:a:{a}"

    def session(self, a: str, channel: str) -> str:
        return f"{self.tag(a)}:s:{a}/{channel}"

    def live(self, shard: int) -> str:
        return f"{self._tags[shard]}:live"

    def events(self, shard: int) -> str:
        return f"{self._tags[shard]}:ev"

    def dead(self, shard: int) -> str:
        return f"{self._tags[shard]}:dead"

    def seq(self, shard: int) -> str:
        return f"{self._tags[shard]}:seq"

    def marker(self, a: str, entry: int) -> str:
        return f"{self.tag(a)}:mv:{entry}"

    def node(self, name: str) -> str:
        return f"{self.prefix}:node:{name}"

    def session_keys(self, a: str, channel: str) -> list[str]:
        """What every call step's script touches: built on every step, so one CRC."""
        tag = self._tags[shard_of(a)]
        return [f"{tag}:a:{a}", f"{tag}:s:{a}/{channel}", f"{tag}:live", f"{tag}:ev"]


@dataclass(frozen=True, slots=True)
class Call:
    script: str
    keys: list[str]
    args: list
    parse: Callable  # reply -> result, or another Call to run next


@dataclass(frozen=True, slots=True)
class Grant:
    """State of a session after answer or extend."""

    # 'ans' (running), 'auth' (not answered), 'done', 'unknown' (Redis forgot it),
    # 'superseded' (a later call on the same channel replaced it)
    state: str
    grant: int  # seconds granted from answer
    grant_end_ms: int
    final: bool
    now_ms: int  # the clock the script used: schedule from it, not from the local clock
    hold: int | None = None  # micro-units held for the session now (None: unchanged)

    @property
    def left_ms(self) -> int:
        return self.grant_end_ms - self.now_ms

    @property
    def live(self) -> bool:
        return self.state == "ans"


@dataclass(frozen=True, slots=True)
class Charge:
    state: str  # 'done' (committed now), 'already', 'superseded', 'unknown', 'alive', 'ans'
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
                 ring_seconds: int = 120, grace: int = 2, stale_grace: int = 30,
                 blind_quota: int = 60):
        self.keys = keys
        self.blind_quota = blind_quota
        self.plans = plans
        self.quota = quota
        self.node = node
        self.ring_seconds = ring_seconds
        self.grace = grace
        self.stale_grace = stale_grace

    def authorize(self, account: str, destination: str, direction: str, channel: str,
                  now_ms: int | None = None, blind: bool = False) -> Call | Decision:
        """First slice of credit for a new call, or a Decision straight away for bad input.
        `blind`: the PBX is out of sight (fail_open): a short grant, `blind_quota`."""
        if direction not in DIRECTIONS or not valid_channel(channel):
            return denied(Reason.BAD_REQUEST)
        if not valid_account(account):
            return denied(Reason.UNKNOWN_ACCOUNT if account else Reason.BAD_REQUEST)
        try:
            number = normalize_number(destination)
        except NumberError:
            return denied(Reason.BAD_REQUEST)
        return self._authorize(account, number, direction, channel, now_ms, blind, False)

    def _authorize(self, account, number, direction, channel, now_ms, blind, retried) -> Call:
        plan = self.plans.plan_for(account)
        rate = self.plans.rate(plan, direction, number)
        shard = shard_of(account)
        keys = [self.keys.account(account), self.keys.session(account, channel),
                self.keys.live(shard), self.keys.seq(shard), self.keys.events(shard)]
        args = [
            _at(now_ms), account, channel, direction, number, plan,
            0 if rate is None else 1,
            *((rate.prefix, rate.rate_per_min, rate.connect_fee, rate.initial_increment,
               rate.subsequent_increment, int(rate.blocked)) if rate else ("", 0, 0, 1, 1, 0)),
            self.blind_quota if blind else self.quota, self.node, self.ring_seconds, self.grace,
            self.stale_grace, int(blind),
        ]

        def parse(reply):
            allow, reason, session, grant, maxsec, extra = reply
            if reason == "PLAN":
                # The account uses another plan than we guessed: learn it, ask again.
                self.plans.account_plan[account] = extra
                if retried:
                    return denied(Reason.UNAVAILABLE)
                return self._authorize(account, number, direction, channel, now_ms, blind, True)
            if reason != "UNKNOWN_ACCOUNT":  # a flood of made-up accounts stays out of memory
                self.plans.account_plan[account] = plan
            return Decision(bool(int(allow)), Reason(reason), session, int(grant),
                            maxsec=int(maxsec), hold=int(extra or 0))

        return Call("authorize", keys, args, parse)

    def answer(self, session: str, now_ms: int | None = None,
               answered_ms: int | None = None) -> Call:
        """The call was answered (at answered_ms, when the PBX told us later)."""
        sid = SessionId.parse(session)
        return Call("answer", self.keys.session_keys(sid.account, sid.channel),
                    [_at(now_ms), sid.n, _at(answered_ms), self.stale_grace], _grant)

    def extend(self, session: str, seen_grant: int, now_ms: int | None = None) -> Call:
        sid = SessionId.parse(session)
        return Call("extend", self.keys.session_keys(sid.account, sid.channel),
                    [_at(now_ms), sid.n, self.quota, seen_grant, self.stale_grace], _grant)

    def commit(self, session: str, cause: str = "", now_ms: int | None = None,
               mode: str = "reported", end_ms: int | None = None,
               answered_ms: int | None = None, talk_ms: int | None = None) -> Call:
        """End a session; see commit.lua for the modes. `answered_ms`: it was answered then,
        though Redis may not have been told; `talk_ms`: the PBX's own billed duration."""
        if mode not in COMMIT_MODES:
            raise ValueError(f"unknown commit mode {mode!r}")
        if talk_ms is not None and not 0 <= talk_ms < MAX_TALK_MS:
            talk_ms = None  # not a duration any PBX reports: the end time tells
        sid = SessionId.parse(session)
        return Call("commit", self.keys.session_keys(sid.account, sid.channel),
                    [_at(now_ms), sid.n, str(cause)[:32], mode, _at(end_ms), self.grace,
                     _at(answered_ms), _at(talk_ms)], _charge)

    def release(self, session: str, now_ms: int | None = None) -> Call:
        """For a call that never started: frees its reservation and channel; an answered
        call is left to its hangup."""
        return self.commit(session, "released", now_ms, mode="release")

    def release_channel(self, account: str, channel: str, now_ms: int | None = None) -> Call:
        """Release whatever call the channel has, if it never answered: for an authorize
        whose reply never came in time (the PBX was given the failure policy instead)."""
        return Call("commit", self.keys.session_keys(account, channel),
                    [_at(now_ms), "", "released", "release", "", self.grace, "", ""], _charge)

    def settings(self, account: str, fields: dict) -> Call:
        """Write the books' settings of an account (see settings.lua)."""
        return Call("settings", [self.keys.account(account), self.keys.events(shard_of(account))],
                    [account, *(x for item in fields.items() for x in item)], lambda _: None)

    def credit(self, account: str, amount: int, entry: int) -> Call:
        """Apply the books' movement `entry` to Redis, once."""
        return Call("credit", [self.keys.account(account), self.keys.marker(account, entry),
                               self.keys.events(shard_of(account))],
                    [amount, account], lambda reply: (bool(reply[0]), int(reply[1])))


def _at(ms: int | None):
    return "" if ms is None else ms


def _grant(reply) -> Grant:
    state, grant, grant_end, final, now, *hold = reply  # extend also tells the hold
    return Grant(state, int(grant), int(grant_end), bool(int(final)), int(now),
                 int(hold[0]) if hold else None)


def _charge(reply) -> Charge:
    state, cost, duration, billed = reply
    return Charge(state, int(cost), int(duration), int(billed))
