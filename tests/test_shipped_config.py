"""The PBX configuration callguard ships: dialplan/asterisk/callguard.conf,
asterisk_conf/manager.conf and the Docker lab in docker/.

There is no Asterisk here, so the dialplan routine is run by a small interpreter
that follows Asterisk 22's rules for the few things it uses (variable and function
substitution, $[...] comparisons, Set/ExecIf/GotoIf/Goto/AGI/Hangup/Return/Gosub).
It refuses anything else, so the routine stays within what is checked here.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from callguard.decisions import HANGUP_CAUSE, Reason
from callguard.protocol.agi import AGIRequest
from callguard.rating import parse_rates_csv

from transcripts import FROM, names, stream

ROOT = Path(__file__).resolve().parents[1]
DIALPLAN = ROOT / "dialplan" / "asterisk" / "callguard.conf"
MANAGER = ROOT / "asterisk_conf" / "manager.conf"
DOCKER = ROOT / "docker"
ROUTINE = "callguard-authorize"


# --- Asterisk .conf files ---------------------------------------------------------------


@dataclass
class Section:
    name: str
    options: str  # "(+)", "(!)", "(template)" or ""
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # key, value, line

    def values(self, key: str) -> list[str]:
        return [v for k, v, _ in self.entries if k.lower() == key.lower()]


@dataclass
class Conf:
    sections: list[Section]
    includes: list[str]
    global_entries: list[tuple[str, str, int]]  # before the first [section]

    def get(self, name: str) -> list[Section]:
        return [s for s in self.sections if s.name == name]


_SECTION = re.compile(r"\[([^\]]+)\]\s*(\([^)]*\))?\s*$")
_ENTRY = re.compile(r"([^=\s][^=]*?)\s*=>?\s*(.*)$")


def strip_comment(line: str) -> str:
    """Drop a ';' comment; '\\;' is a literal semicolon (Asterisk's config.c rules)."""
    out = []
    i = 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line) and line[i + 1] == ";":
            out.append(";")
            i += 2
            continue
        if line[i] == ";":
            break
        out.append(line[i])
        i += 1
    return "".join(out).strip()


def parse_conf(text: str) -> Conf:
    sections: list[Section] = []
    includes: list[str] = []
    top: list[tuple[str, str, int]] = []
    in_block = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw
        if in_block:  # ;-- block comment --;
            if "--;" not in line:
                continue
            line = line.split("--;", 1)[1]
            in_block = False
        if ";--" in line:
            before, after = line.split(";--", 1)
            if "--;" in after:
                line = before + after.split("--;", 1)[1]
            else:
                line, in_block = before, True
        line = strip_comment(line)
        if not line:
            continue
        if line.startswith("#include"):
            includes.append(line[len("#include"):].strip().strip('"<>'))
            continue
        if line.startswith("["):
            match = _SECTION.match(line)
            assert match, f"line {number}: bad section header {raw!r}"
            sections.append(Section(match[1], match[2] or ""))
            continue
        match = _ENTRY.match(line)
        assert match, f"line {number}: not 'key = value' nor 'key => value': {raw!r}"
        entry = (match[1].strip(), match[2].strip(), number)
        (sections[-1].entries if sections else top).append(entry)
    return Conf(sections, includes, top)


def load_conf(path: Path) -> Conf:
    return parse_conf(path.read_text(encoding="utf-8"))


# --- extensions.conf: contexts, extensions, priorities ----------------------------------


@dataclass
class Step:
    number: int
    label: str | None
    app: str
    data: str
    line: int


def split_app(text: str) -> tuple[str, str]:
    """'Set(A=B)' -> ('Set', 'A=B'): the data runs to the LAST ')' (pbx_config.c)."""
    if "(" not in text:
        return text.strip(), ""
    name, rest = text.split("(", 1)
    assert rest.rstrip().endswith(")"), f"no closing ')' in {text!r}"
    return name.strip(), rest.rstrip()[:-1]


_PRIORITY = re.compile(r"(\d+|n)(?:\(([A-Za-z0-9_-]+)\))?$")


def dialplan(conf: Conf) -> dict[str, dict[str, list[Step]]]:
    contexts: dict[str, dict[str, list[Step]]] = {}
    for section in conf.sections:
        if section.name in ("general", "globals"):
            continue
        exts = contexts.setdefault(section.name, {})
        current = None
        for key, value, line in section.entries:
            if key == "exten":
                name, priority, app = value.split(",", 2)
                current = name.strip()
            elif key == "same":
                assert current is not None, f"line {line}: 'same' without an 'exten' before it"
                priority, app = value.split(",", 1)
            else:
                continue
            match = _PRIORITY.match(priority.strip())
            assert match, f"line {line}: bad priority {priority!r}"
            steps = exts.setdefault(current, [])
            if match[1] == "n":
                assert steps, f"line {line}: 'n' needs a priority before it"
                number = steps[-1].number + 1
            else:
                number = int(match[1])
            steps.append(Step(number, match[2], *split_app(app), line))
    return contexts


def pattern_regex(exten: str) -> re.Pattern | None:
    """An Asterisk extension pattern (_X., _[+0-9].) as a regex; None for a literal."""
    if not exten.startswith("_"):
        return None
    out, i, body = [], 0, exten[1:]
    while i < len(body):
        c = body[i]
        if c == "[":
            end = body.index("]", i)
            out.append("[" + re.sub(r"([\\^])", r"\\\1", body[i + 1:end]) + "]")
            i = end + 1
            continue
        out.append({"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]", ".": ".+", "!": ".*"}
                   .get(c.upper(), re.escape(c)))
        i += 1
    return re.compile("".join(out))


# --- a small Asterisk: substitution, expressions, the applications used --------------------


class Refused(Exception):
    """The dialplan used something this interpreter does not model."""


@dataclass
class End:
    how: str  # "hangup", "return" (from the outermost Gosub), "dial"
    cause: int | None = None
    data: str = ""


def uriencode(text: str) -> str:
    """URIENCODE(): ast_uri_encode with ast_uri_http, i.e. every byte but the RFC 2396
    unreserved characters (alphanumerics and -_.!~*'()) as %XX (main/utils.c)."""
    keep = set("-_.!~*'()")
    return "".join(
        chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in keep) else f"%{b:02X}"
        for b in text.encode("utf-8"))


def condition(value: str) -> bool:
    """pbx_checkcondition(): empty is false, a number is its value, other text is true."""
    value = value.strip()
    if not value:
        return False
    match = re.match(r"\s*([+-]?\d+)", value)
    return bool(int(match[1])) if match else True


def expression(text: str) -> str:
    """$[...] as used in the shipped dialplan: one operand, or 'a OP b' with a comparison."""
    tokens = re.findall(r'"[^"]*"|\S+', text)

    def operand(token: str) -> str:
        return token[1:-1] if len(token) >= 2 and token[0] == token[-1] == '"' else token

    if len(tokens) == 1:
        return operand(tokens[0])
    if len(tokens) != 3 or tokens[1] not in ("=", "==", "!=", "<", ">", "<=", ">="):
        raise Refused(f"expression not modelled: $[{text}]")
    a, op, b = operand(tokens[0]), tokens[1], operand(tokens[2])
    if re.fullmatch(r"-?\d+", a) and re.fullmatch(r"-?\d+", b):
        x, y = int(a), int(b)
    else:
        x, y = a, b
    result = {"=": x == y, "==": x == y, "!=": x != y, "<": x < y, ">": x > y,
              "<=": x <= y, ">=": x >= y}[op]
    return "1" if result else "0"


def closing(text: str, start: int, open_: str, close: str) -> int:
    depth = 1
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    raise Refused(f"unbalanced {open_}{close} in {text!r}")


@dataclass
class Channel:
    contexts: dict[str, dict[str, list[Step]]]
    variables: dict[str, str] = field(default_factory=dict)
    globals: dict[str, str] = field(default_factory=dict)
    agi: object = None  # callable(url) -> (AGISTATUS, {variable: value})
    agi_urls: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    exten: str = ""
    context: str = ""
    stack: list[tuple[str, str, int, dict]] = field(default_factory=list)

    # -- substitution (pbx_substitute_variables_helper) --
    def substitute(self, text: str) -> str:
        out, i = [], 0
        while i < len(text):
            if text.startswith("${", i):
                end = closing(text, i + 2, "{", "}")
                out.append(self.lookup(self.substitute(text[i + 2:end])))
                i = end + 1
            elif text.startswith("$[", i):
                end = closing(text, i + 2, "[", "]")
                out.append(expression(self.substitute(text[i + 2:end])))
                i = end + 1
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def lookup(self, inner: str) -> str:
        call = re.fullmatch(r"([A-Z_]+)\((.*)\)", inner, re.S)
        if call:
            return self.function(call[1], call[2])
        name, _, offsets = inner.partition(":")
        value = self.variables.get(name, self.globals.get(name, ""))
        if name == "EXTEN":
            value = self.exten
        if offsets:
            parts = offsets.split(":")
            start = int(parts[0] or 0)
            value = value[start:]
            if len(parts) > 1 and parts[1]:
                value = value[:int(parts[1])]
        return value

    def function(self, name: str, args: str) -> str:
        if name == "LEN":
            return str(len(args))
        if name == "URIENCODE":
            return uriencode(args)
        if name == "FILTER":
            allowed, _, text = args.partition(",")
            if allowed != "0-9":
                raise Refused(f"FILTER({allowed},...) not modelled")
            return "".join(c for c in text if c.isdigit())
        if name == "CHANNEL" and args == "accountcode":
            return self.variables.get("__accountcode", "")
        if name == "DIALPLAN_EXISTS":
            context, exten, priority = (args.split(",") + ["", "", ""])[:3]
            steps = self.contexts.get(context, {})
            if any(pattern_regex(e) for e in steps):
                raise Refused("DIALPLAN_EXISTS on a context with patterns not modelled")
            found = any(s.number == int(priority or 1) for s in steps.get(exten, []))
            return "1" if exten and found else "0"
        raise Refused(f"function {name}() not modelled")

    # -- running --
    def find(self, context: str, exten: str) -> tuple[str, list[Step]]:
        exts = self.contexts[context]
        if exten in exts:
            return exten, exts[exten]
        for name, steps in exts.items():
            regex = pattern_regex(name)
            if regex and regex.fullmatch(exten):
                return name, steps
        raise Refused(f"no extension {exten} in [{context}]")

    def goto(self, target: str) -> tuple[str, str, int]:
        parts = [p.strip() for p in target.split(",")]
        context, exten = self.context, self.exten
        if len(parts) == 3:
            context, exten, priority = parts
        elif len(parts) == 2:
            exten, priority = parts
        else:
            (priority,) = parts
        _, steps = self.find(context, exten)
        for index, step in enumerate(steps):
            if step.label == priority or (priority.isdigit() and step.number == int(priority)):
                return context, exten, index
        raise Refused(f"no priority {priority} in {context},{exten}")

    def run(self, context: str, exten: str, limit: int = 200) -> End:
        self.context, self.exten, index = context, exten, 0
        for _ in range(limit):
            _, steps = self.find(self.context, self.exten)
            if index >= len(steps):
                return End("fell off the end of " + f"{self.context},{self.exten}")
            step = steps[index]
            data = self.substitute(step.data)
            self.trace.append(f"{self.context},{self.exten},{step.number}: {step.app}({data})")
            result = self.execute(step.app, data)
            if isinstance(result, End):
                return result
            if isinstance(result, tuple):
                self.context, self.exten, index = result
            else:
                index += 1
        raise AssertionError("dialplan loops:\n" + "\n".join(self.trace[-20:]))

    def execute(self, app: str, data: str):
        if app in ("NoOp", "Log", "Verbose"):
            return None
        if app == "Set":
            name, _, value = data.partition("=")
            local = re.fullmatch(r"LOCAL\((\w+)\)", name)
            self.variables[local[1] if local else name] = value
            return None
        if app == "ExecIf":  # app_exec.c, preferred syntax only
            comma, question = data.find(","), data.find("?")
            if question < 0 or 0 <= comma < question:
                raise Refused(f"ExecIf in the deprecated syntax: {data!r}")
            expr, rest = data.split("?", 1)
            true_app, _, false_app = rest.partition(":")
            chosen = true_app if condition(expr) else false_app
            if chosen:
                name, _, args = chosen.partition("(")
                end = args.rfind(")")
                return self.execute(name, args[:end] if end >= 0 else args)
            return None
        if app == "GotoIf":  # pbx_builtin_gotoif
            cond, _, branches = data.partition("?")
            yes, _, no = branches.partition(":")
            target = yes if condition(cond) else no
            return self.goto(target) if target else None
        if app == "Goto":
            return self.goto(data)
        if app == "AGI":
            url = data.split(",")[0]
            self.agi_urls.append(data)
            status, variables = self.agi(url)
            self.variables.update(variables)
            self.variables["AGISTATUS"] = status
            if status == "HANGUP":
                return End("hangup", None, "caller hung up during the AGI")
            return None
        if app == "Hangup":
            return End("hangup", int(data) if data else None)
        if app == "Gosub":
            where, _, args = data.partition("(")
            args = args[:args.rfind(")")] if args else ""
            saved = {k: self.variables.pop(k) for k in list(self.variables)
                     if re.fullmatch(r"ARG\d+", k)}
            self.stack.append((self.context, self.exten, 0, saved))
            for n, value in enumerate(args.split(","), 1):
                self.variables[f"ARG{n}"] = value
            caller = (self.context, self.exten)
            context, exten, _priority = (p.strip() for p in where.split(","))
            end = self.run(context, exten)
            if end.how != "return":
                return end
            self.context, self.exten = caller
            self.stack.pop()
            return None
        if app == "Return":
            return End("return")
        if app == "Dial":
            return End("dial", None, data)
        raise Refused(f"application {app}() not modelled")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contexts():
    return dialplan(load_conf(DIALPLAN))


def agi_answer(status="SUCCESS", **variables):
    return lambda url: (status, dict(variables))


def authorize(contexts, args=("", "", ""), status="SUCCESS", variables=None,
              channel_vars=None, globals_=None) -> tuple[End, Channel]:
    channel = Channel(contexts, dict(channel_vars or {}), dict(globals_ or {}),
                      agi=agi_answer(status, **(variables or {})))
    for n, value in enumerate(args, 1):
        channel.variables[f"ARG{n}"] = value
    return channel.run(ROUTINE, "s"), channel


DENY_REASONS = [r for r in Reason if r is not Reason.OK]


# --- the routine ----------------------------------------------------------------------------


def test_the_routine_exists_and_is_a_gosub_target(contexts):
    assert ROUTINE in contexts
    steps = contexts[ROUTINE]["s"]
    assert steps[0].number == 1
    assert [s.app for s in steps].count("Return") == 1


def test_every_deny_reason_has_a_cause():
    # The table the dialplan mirrors must cover every reason a deny can carry.
    assert set(HANGUP_CAUSE) == set(DENY_REASONS)


@pytest.mark.parametrize("reason", DENY_REASONS, ids=str)
def test_each_deny_reason_hangs_up_with_the_cause_of_decisions(contexts, reason):
    # Handled by name, not only by the default branch ...
    table = contexts[ROUTINE]
    assert reason.value in table, f"{reason} has no line of its own in the cause table"
    # ... and the call really ends with callguard.decisions.HANGUP_CAUSE[reason].
    end, channel = authorize(contexts, variables={"CALLGUARD_RESULT": "DENY",
                                                  "CALLGUARD_REASON": reason.value})
    assert end == End("hangup", HANGUP_CAUSE[reason]), channel.trace


@pytest.mark.parametrize("reason", ["SOMETHING_NEW", "", "OK"])
def test_a_deny_with_another_reason_is_rejected_with_21(contexts, reason):
    end, channel = authorize(contexts, variables={"CALLGUARD_RESULT": "DENY",
                                                  "CALLGUARD_REASON": reason})
    assert end == End("hangup", 21), channel.trace


def test_allow_returns_with_the_variables_set(contexts):
    result = {"CALLGUARD_RESULT": "ALLOW", "CALLGUARD_REASON": "OK", "CALLGUARD_GRANT": "60",
              "CALLGUARD_MAXSEC": "3540", "CALLGUARD_SESSION": "41440000001/1795236355.1310"}
    end, channel = authorize(contexts, variables=result)
    assert end.how == "return", channel.trace
    for name, value in result.items():
        assert channel.variables[name] == value


def test_fail_open_allow_goes_through(contexts):
    # callguard's fail_open policy answers ALLOW with reason UNAVAILABLE.
    end, _ = authorize(contexts, variables={"CALLGUARD_RESULT": "ALLOW",
                                            "CALLGUARD_REASON": "UNAVAILABLE"})
    assert end.how == "return"


def test_unreachable_callguard_is_a_deny(contexts):
    # Connection refused or the 2 s connect timeout: AGISTATUS=FAILURE, and Asterisk goes
    # on with the next priority (agi-hangup-during.refused / .connect-timeout transcripts).
    end, channel = authorize(contexts, ("41440000001", "0791234567", "outbound"), "FAILURE")
    assert end == End("hangup", HANGUP_CAUSE[Reason.UNAVAILABLE]), channel.trace
    assert channel.variables["CALLGUARD_RESULT"] == "DENY"
    assert channel.variables["CALLGUARD_REASON"] == "UNAVAILABLE"


def test_a_stale_allow_does_not_survive_a_failed_agi(contexts):
    # A failed AGI sets nothing: an ALLOW from an earlier run on the channel must not count.
    before = {"CALLGUARD_RESULT": "ALLOW", "CALLGUARD_REASON": "OK"}
    end, _ = authorize(contexts, status="FAILURE", channel_vars=before)
    assert end.how == "hangup"


def test_an_answer_without_a_result_is_a_deny(contexts):
    # Something else listening on the port, or a script that set nothing.
    end, _ = authorize(contexts, status="SUCCESS")
    assert end == End("hangup", HANGUP_CAUSE[Reason.UNAVAILABLE])


def test_a_caller_who_hangs_up_during_the_agi_never_reaches_dial(contexts):
    end, _ = authorize(contexts, status="HANGUP")
    assert end.how == "hangup"


def test_agistatus_is_checked_before_the_result(contexts):
    steps = contexts[ROUTINE]["s"]
    agi = max(i for i, s in enumerate(steps) if s.app == "AGI")
    checks = [(i, s) for i, s in enumerate(steps) if i > agi and s.app == "GotoIf"]
    first_status = min(i for i, s in checks if "AGISTATUS" in s.data)
    first_result = min(i for i, s in checks if "CALLGUARD_RESULT" in s.data)
    assert first_status <= first_result
    # and the result is cleared before the AGI: a failed AGI sets nothing
    assert any(s.app == "Set" and s.data == "CALLGUARD_RESULT=" for s in steps[:agi])


# --- the FastAGI URL -----------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("41440000001", "+41791234567", "outbound"),
    ("41440000001", "0791234567", "inbound"),
    ("", "0900123456", ""),
    ("41440000001", "", ""),
    ("acct,with,commas", "x&y=z %+", "outbound"),
    ("", "", ""),
])
def test_the_agi_url_carries_exactly_the_given_arguments(contexts, args):
    end, channel = authorize(contexts, args, variables={"CALLGUARD_RESULT": "ALLOW"})
    assert end.how == "return"
    [data] = channel.agi_urls
    assert "," not in data, "a comma would split the AGI() arguments"
    url = urlsplit(data)
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "agi", "127.0.0.1", 4573, "/authorize")
    # What callguard's own FastAGI parser makes of it (agi_network_script keeps the query).
    script = data.split("/", 3)[3]
    request = AGIRequest.from_headers({"agi_channel": "PJSIP/sipp-00000000",
                                       "agi_uniqueid": "1795236355.1310",
                                       "agi_network_script": script})
    assert request.script == "authorize"
    expected = {k: v for k, v in zip(("account", "dest", "direction"), args, strict=True) if v}
    assert request.params == expected


def test_the_agi_server_can_be_moved_without_editing_the_file(contexts):
    end, channel = authorize(contexts, ("", "0791234567", ""),
                             variables={"CALLGUARD_RESULT": "ALLOW"},
                             globals_={"CALLGUARD_AGI_SERVER": "callguard.lab:4573"})
    assert channel.agi_urls == ["agi://callguard.lab:4573/authorize?dest=0791234567"]


def test_uriencode_model_matches_asterisk():
    # ast_uri_http keeps only alphanumerics and -_.!~*'() (main/utils.c, func_uri.c).
    assert uriencode("+41 79,x&y=z") == "%2B41%2079%2Cx%26y%3Dz"
    assert uriencode("a-b_c.d!e~f*g'h(i)") == "a-b_c.d!e~f*g'h(i)"


# --- the example contexts -------------------------------------------------------------------


def run_example(contexts, context, exten, accountcode, answer):
    channel = Channel(contexts, {"__accountcode": accountcode}, agi=answer)
    return channel.run(context, exten), channel


def test_outbound_example_authorizes_then_dials(contexts):
    end, channel = run_example(contexts, "callguard-outbound-example", "0791234567",
                               "41440000001", agi_answer(CALLGUARD_RESULT="ALLOW"))
    assert end == End("dial", None, "PJSIP/0791234567@your-trunk,60"), channel.trace
    assert channel.agi_urls == ["agi://127.0.0.1:4573/authorize?account=41440000001"
                                "&dest=0791234567&direction=outbound"]
    end, _ = run_example(contexts, "callguard-outbound-example", "0791234567", "41440000001",
                         agi_answer(CALLGUARD_RESULT="DENY", CALLGUARD_REASON="NO_FUNDS"))
    assert end == End("hangup", 21)


def test_inbound_example_authorizes_the_called_customer(contexts):
    end, channel = run_example(contexts, "callguard-inbound-example", "+41441234567", "",
                               agi_answer(CALLGUARD_RESULT="ALLOW"))
    assert end.how == "dial", channel.trace
    assert channel.agi_urls == ["agi://127.0.0.1:4573/authorize?account=41441234567"
                                "&dest=%2B41441234567&direction=inbound"]
    end, _ = run_example(contexts, "callguard-inbound-example", "41441234567", "",
                         agi_answer("FAILURE"))
    assert end == End("hangup", 41)


def test_every_call_path_in_the_file_is_modelled(contexts):
    # Every application and function used anywhere in the file is one the interpreter knows
    # (so the behaviour tested above is the behaviour of the whole file).
    known = {"NoOp", "Log", "Set", "ExecIf", "GotoIf", "Goto", "AGI", "Hangup", "Return",
             "Gosub", "Dial"}
    for context, exts in contexts.items():
        for exten, steps in exts.items():
            for step in steps:
                assert step.app in known, f"{context},{exten},{step.number}: {step.app}"
                for function in re.findall(r"\$\{([A-Z_]+)\(", step.data):
                    assert function in {"LEN", "URIENCODE", "DIALPLAN_EXISTS", "CHANNEL",
                                        "FILTER"}, function


# --- manager.conf ---------------------------------------------------------------------------

# Classes main/manager.c registers the actions with (ast_manager_register_xml_core); an
# action is allowed when (writeperm & authority) != 0, or when its authority is 0.
ACTION_CLASSES = {
    "Login": set(), "Logoff": set(), "Ping": set(), "Events": set(), "Challenge": set(),
    "AbsoluteTimeout": {"system", "call"},
    "Hangup": {"system", "call"},
    "CoreShowChannels": {"system", "reporting"},
    "Filter": {"system"},
    "Getvar": {"call", "reporting"},
    "Setvar": {"call"},
    "Originate": {"originate"},
}
CONSUMED_EVENTS = ("Newchannel", "DialEnd", "Newstate", "Hangup")


def actions_callguard_sends() -> set[str]:
    """AMI actions built by callguard/protocol/ami.py that the adapters actually use."""
    builders = {}
    source = (ROOT / "callguard" / "protocol" / "ami.py").read_text()
    for name, body in re.findall(r"\ndef (\w+)\((.*?)(?=\ndef |\Z)", source, re.S):
        action = re.search(r'format_action\(\s*"(\w+)"', body)
        if action:
            builders[name] = action[1]
    used = set()
    for path in (ROOT / "callguard" / "adapters").glob("*.py"):
        used |= set(re.findall(r"\bami\.(\w+)\b", path.read_text()))
    return {builders[name] for name in used if name in builders}


@pytest.fixture(scope="module")
def user():
    conf = load_conf(MANAGER)
    assert [s.name for s in conf.sections] == ["callguard"], "only the callguard user"
    assert not conf.includes and not conf.global_entries
    return conf.sections[0]


def classes(value: str) -> set[str]:
    return {c.strip().lower() for c in value.split(",") if c.strip()}


def test_read_is_only_the_call_class(user):
    assert [classes(v) for v in user.values("read")] == [{"call"}]


def test_write_allows_every_action_callguard_sends_and_no_more(user):
    [write] = [classes(v) for v in user.values("write")]
    assert write == {"call", "reporting"}
    sent = actions_callguard_sends() | {"Login", "Ping", "Logoff"}
    assert {"AbsoluteTimeout", "Hangup", "CoreShowChannels"} <= sent
    for action in sent:
        assert action in ACTION_CLASSES, f"{action}: add its class from manager.c here"
        needed = ACTION_CLASSES[action]
        assert not needed or needed & write, f"write= does not allow {action}"
    # Nothing that could change the system: not system, command, config, originate, all.
    assert not write & {"system", "command", "config", "originate", "all", "agent", "user"}


def apply_acl(rules: list[tuple[str, str]], address: str) -> bool:
    """main/acl.c ast_apply_ha: start allowed, the last matching rule wins, IPv4 rules apply
    to IPv4 and IPv4-mapped peers only, IPv6 rules to IPv6 peers only."""
    peer = ipaddress.ip_address(address)
    if peer.version == 6 and peer.ipv4_mapped:
        peer = peer.ipv4_mapped
    allowed = True
    for sense, spec in rules:
        net = ipaddress.ip_network(spec, strict=False)
        if net.version == peer.version and peer in net:
            allowed = sense == "permit"
    return allowed


def test_only_loopback_may_log_in(user):
    rules = [(k.lower(), v) for k, v, _ in user.entries if k.lower() in ("permit", "deny")]
    assert rules[0] == ("deny", "0.0.0.0/0.0.0.0"), "deny everything first"
    assert ("deny", "::/0") in rules
    for sense, spec in rules:
        if sense == "permit":
            assert ipaddress.ip_network(spec, strict=False).is_loopback, spec
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert apply_acl(rules, peer), peer
    for peer in ("192.0.2.10", "10.0.0.1", "0.0.0.0", "2001:db8::10", "::ffff:192.0.2.10",
                 "127.0.0.2"):
        assert not apply_acl(rules, peer), peer


def test_the_secret_is_a_placeholder_that_says_so(user):
    [secret] = user.values("secret")
    assert "CHANGE" in secret.upper()
    text = MANAGER.read_text()
    assert re.search(r";.*CHANGE THIS", text), "a comment must tell the admin to change it"


# The [general] keys main/manager.c reads (__init_manager and ast_tls_read_conf); it skips
# tlscafile, tlscapath, tlscadir, tlsverifyclient, tlsdontverifyserver and tls/sslclientmethod
# for AMI (it checks no client certificate), so an example offering them would mislead.
MANAGER_GENERAL = {
    "enabled", "webenabled", "port", "bindaddr", "brokeneventsaction", "allowmultiplelogin",
    "displayconnects", "timestampevents", "debug", "httptimeout", "authtimeout", "authlimit",
    "channelvars", "tlsenable", "sslenable", "tlsbindaddr", "sslbindaddr", "tlscertfile",
    "sslcert", "tlscert", "tlsprivatekey", "sslprivatekey", "tlscipher", "sslcipher",
}


def test_the_general_example_shows_plain_text_on_loopback_and_tls():
    """The commented [general] lines an admin copies: plain AMI on loopback, AMI over TLS
    with a certificate and key, and only keys Asterisk reads there."""
    text = MANAGER.read_text()
    start = text.index(";   [general]\n")
    block = []
    for line in text[start:].splitlines():
        if not line.startswith(";   "):
            break
        block.append(line[1:])
    [general] = parse_conf("\n".join(block)).get("general")
    keys = {k.lower() for k, _, _ in general.entries}
    assert keys <= MANAGER_GENERAL, keys - MANAGER_GENERAL
    values = {k.lower(): v for k, v, _ in general.entries}
    assert ipaddress.ip_address(values["bindaddr"]).is_loopback  # the plain-text port
    assert values["tlsenable"] == "yes"
    assert {"tlsbindaddr", "tlscertfile", "tlsprivatekey"} <= keys
    assert values["tlsbindaddr"].endswith(":5039")  # amis:// without a port: 5039
    assert "amis://callguard:" in text and "CALLGUARD_AMI_TLS_CA" in text


def ami_events() -> list[str]:
    """Every event's raw text from the recorded AMI sessions (without the blank line)."""
    events = []
    for name in names("ami"):
        data = stream(name, FROM).decode()
        if data.startswith("Asterisk Call Manager/"):
            data = data.split("\r\n", 1)[1]
        events += [b for b in data.split("\r\n\r\n") if b.startswith("Event: ")]
    return events


def event_name(raw: str) -> str:
    return raw.split("\r\n", 1)[0][len("Event: "):]


@pytest.fixture(scope="module")
def filters(user):
    values = user.values("eventfilter")
    assert values, "eventfilter lines keep only the events callguard uses"
    for value in values:
        assert not value.startswith("!"), "include filters only: they are ORed"
        # Characters whose meaning is the same in POSIX basic and extended regular
        # expressions (what Asterisk compiles) and in Python's re (what this test runs).
        assert re.fullmatch(r"[A-Za-z0-9 :^\[\]-]+", value), value
    return [re.compile(v) for v in values]


def passes(filters, raw: str) -> bool:
    return any(f.search(raw) for f in filters)


@pytest.mark.parametrize("name", CONSUMED_EVENTS)
def test_filters_let_every_recorded_consumed_event_through(filters, name):
    recorded = [e for e in ami_events() if event_name(e) == name]
    assert recorded, f"no {name} event in the fixtures"
    for raw in recorded:
        assert passes(filters, raw), raw[:200]


def test_filters_drop_every_other_recorded_event(filters):
    events = ami_events()
    others = {event_name(e) for e in events} - set(CONSUMED_EVENTS)
    assert {"VarSet", "HangupRequest", "SoftHangupRequest", "NewCallerid", "DialBegin"} <= others
    for raw in events:
        if event_name(raw) not in CONSUMED_EVENTS:
            assert not passes(filters, raw), raw[:200]


def test_the_adapter_consumes_exactly_these_events():
    source = (ROOT / "callguard" / "adapters" / "asterisk.py").read_text()
    used = re.search(r'if name not in \(([^)]*)\)', source)
    assert used, "the adapter's event switch moved: update CONSUMED_EVENTS and manager.conf"
    assert set(re.findall(r'"(\w+)"', used[1])) == set(CONSUMED_EVENTS)


# --- the Docker lab ------------------------------------------------------------------------


def test_lab_asterisk_uses_the_shipped_files_unchanged():
    compose = (DOCKER / "compose.yaml").read_text()
    assert "../dialplan/asterisk/callguard.conf:/etc/asterisk/callguard.conf" in compose
    assert "../asterisk_conf/manager.conf:/etc/asterisk/manager_callguard.conf" in compose
    extensions = load_conf(DOCKER / "asterisk" / "extensions.conf")
    assert "callguard.conf" in extensions.includes
    manager = load_conf(DOCKER / "asterisk" / "manager.conf")
    assert "manager_callguard.conf" in manager.includes
    [general] = manager.get("general")
    assert general.values("enabled") == ["yes"]


def service_ip(compose: str, service: str) -> str:
    """The fixed address of a compose service (no YAML library here: by indentation)."""
    block = re.search(rf"^  {service}:\n((?:    .*\n|\n)*)", compose, re.M)
    assert block, f"no service {service} in compose.yaml"
    address = re.search(r"ipv4_address:\s*([\d.]+)", block[1])
    assert address, f"service {service} has no fixed address"
    return address[1]


def test_lab_ami_user_admits_the_callguard_container_with_the_compose_secret():
    compose = (DOCKER / "compose.yaml").read_text()
    url = re.search(r"CALLGUARD_AMI_URL:\s*ami://callguard:([^@]+)@([\d.]+):5038", compose)
    assert url, "compose.yaml must give callguard its AMI URL"
    callguard_ip = service_ip(compose, "callguard")
    shipped = load_conf(MANAGER).sections[0]
    [append] = [s for s in load_conf(DOCKER / "asterisk" / "manager.conf").sections
                if s.name == "callguard"]
    assert append.options == "(+)", "the lab appends to the shipped user, it does not redefine it"
    entries = shipped.entries + append.entries  # what Asterisk sees after #include and (+)
    secret = [v for k, v, _ in entries if k == "secret"][-1]
    assert secret == url[1]
    rules = [(k, v) for k, v, _ in entries if k in ("permit", "deny")]
    assert apply_acl(rules, callguard_ip)
    assert not apply_acl(rules, "172.28.0.50")  # SIPp, the "hacked PBX", may not


def test_lab_dialplan_sends_sipp_calls_through_callguard_to_a_far_end():
    conf = load_conf(DOCKER / "asterisk" / "extensions.conf")
    contexts = dialplan(conf) | dialplan(load_conf(DIALPLAN))
    [globals_] = conf.get("globals")
    server = dict((k, v) for k, v, _ in globals_.entries)["CALLGUARD_AGI_SERVER"]
    pjsip = load_conf(DOCKER / "asterisk" / "pjsip.conf")
    [endpoint] = [s for s in pjsip.sections if s.values("type") == ["endpoint"]]
    [account] = endpoint.values("accountcode")
    [context] = endpoint.values("context")
    channel = Channel(contexts, {"__accountcode": account}, {"CALLGUARD_AGI_SERVER": server},
                      agi=agi_answer(CALLGUARD_RESULT="ALLOW"))
    end = channel.run(context, "0900123456")
    assert end.how == "dial" and "@lab-farend" in end.data, channel.trace
    assert channel.agi_urls == [f"agi://{server}/authorize?account={account}"
                                f"&dest=0900123456&direction=outbound"]
    compose = (DOCKER / "compose.yaml").read_text()
    allow = re.search(r"CALLGUARD_AGI_ALLOW:\s*\"?([^\"\n]+)", compose)[1]
    asterisk_ip = service_ip(compose, "asterisk")
    assert any(ipaddress.ip_address(asterisk_ip) in ipaddress.ip_network(n.strip())
               for n in allow.split(","))


def test_lab_rates_import_cleanly():
    text = (DOCKER / "lab" / "rates.csv").read_text()
    rates = parse_rates_csv(text)
    prefixes = {r.prefix: r for r in rates}
    assert "0900" in prefixes and not prefixes["0900"].blocked
    assert any(r.blocked for r in rates)
    assert list(csv.reader(io.StringIO(text)))[0][0] == "prefix"


def test_lab_sipp_scenario_is_well_formed():
    root = ET.parse(DOCKER / "sipp" / "fraud.xml").getroot()
    assert root.tag == "scenario"
    commands = [(e.tag, e.attrib) for e in root]
    labels = {a["id"] for t, a in commands if t == "label"}
    for _, attrib in commands:
        for key in ("next", "ontimeout"):
            if key in attrib:
                assert attrib[key] in labels, attrib
    # Held calls end by Asterisk's BYE (callguard's cut-off); denials are acknowledged.
    assert ("recv", {"request": "BYE"}) in [(t, {"request": a.get("request")})
                                             for t, a in commands if t == "recv"]
    denials = {a["response"] for t, a in commands if t == "recv" and a.get("next") == "denied"}
    assert {"403", "404", "503", "603"} <= denials
