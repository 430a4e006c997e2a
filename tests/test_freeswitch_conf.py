"""The FreeSWITCH configuration callguard ships (freeswitch_conf/) and the XML dialplan
interpreter the simulated FreeSWITCH runs it with (callguard.simulator.fs_dialplan).

There is no FreeSWITCH here: the dialplan is hunted by Dialplan, which follows
mod_dialplan_xml for what it models and refuses the rest, and the call is then run by a
few lines below that do what FreeSWITCH 1.10.12 was recorded doing (socket returns, or
fails, and the dialplan goes on; transfer hunts again).
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from collections import ChainMap
from pathlib import Path

import pytest

from callguard.config import Settings
from callguard.simulator.fs_dialplan import Dialplan, expand

ROOT = Path(__file__).resolve().parents[1]
DIALPLAN = ROOT / "freeswitch_conf" / "dialplan" / "callguard.xml"
EVENT_SOCKET = ROOT / "freeswitch_conf" / "autoload_configs" / "event_socket.conf.xml"
METERED, CHECKED = "callguard", "callguard_checked"
# What the simulated FreeSWITCH must implement to run the shipped dialplan.
APPLICATIONS = {"unset", "set", "socket", "transfer", "bridge", "hangup"}
# mod_event_socket.c config(): the settings it reads.
ESL_PARAMS = {"listen-ip", "listen-port", "password", "apply-inbound-acl", "nat-map", "debug",
              "stop-on-bind-error"}
NUMBER = "+41791234567"


# --- the shipped files: what FreeSWITCH 1.10 loads ------------------------------------------


@pytest.mark.parametrize("path", [DIALPLAN, EVENT_SOCKET])
def test_shipped_file_is_well_formed_and_safe_for_the_preprocessor(path):
    ET.parse(path)  # expat: also rejects "--" inside comments
    text = path.read_text(encoding="utf-8")
    # FreeSWITCH's preprocessor works on raw lines, comments included.
    assert "$${" not in text and "x-pre-process" not in text.lower()
    assert not text.startswith("<?xml"), "included files carry no XML declaration"


def test_dialplan_has_the_structure_of_a_dialplan_include():
    root = ET.parse(DIALPLAN).getroot()
    assert root.tag == "include"
    assert [(c.tag, c.get("name")) for c in root] == [("context", METERED),
                                                      ("context", CHECKED)]
    for context in root:
        assert 1 <= len(context) <= 2
        for extension in context:
            assert extension.tag == "extension" and extension.get("name")
            assert extension.get("continue") is None
            for condition in extension:
                assert condition.tag == "condition"
                for action in condition:
                    assert action.tag in ("action", "anti-action")
                    assert action.get("application") in APPLICATIONS, action.attrib
                    assert action.get("inline") is None


def esl_params() -> dict[str, str]:
    root = ET.parse(EVENT_SOCKET).getroot()
    assert (root.tag, root.attrib) == ("configuration", {"name": "event_socket.conf",
                                                          "description": "Socket Client"})
    [settings] = list(root)
    assert settings.tag == "settings"
    params = {}
    for param in settings:
        assert param.tag == "param" and set(param.attrib) == {"name", "value"}, param.attrib
        assert param.get("name") in ESL_PARAMS, param.get("name")
        assert param.get("name") not in params, f"{param.get('name')} given twice"
        params[param.get("name")] = param.get("value")
    return params


def test_event_socket_listens_on_loopback_only_behind_an_acl():
    params = esl_params()
    assert ipaddress.ip_address(params["listen-ip"]).is_loopback
    assert params["listen-port"] == "8021"
    assert params["nat-map"] == "false"
    assert params["apply-inbound-acl"] == "loopback.auto"  # built in: loads as is


def test_event_socket_password_is_a_placeholder_that_says_so():
    password = esl_params()["password"]
    assert password and password.lower() != "cluecon"
    assert "CHANGE" in password.upper()
    text = EVENT_SOCKET.read_text()
    assert re.search(r"<!--[^>]*CHANGE THIS", text), "a comment must tell the admin"


# --- the shipped dialplan, hunted ----------------------------------------------------------


@pytest.fixture(scope="module")
def dialplan():
    return Dialplan.load(DIALPLAN)


def test_metered_context_clears_the_result_then_asks_callguard_then_transfers(dialplan):
    actions = dialplan.hunt(METERED, {"destination_number": NUMBER}, {})
    apps = [a for a, _ in actions]
    assert apps == ["unset", "set", "socket", "transfer"]
    assert actions[0] == ("unset", "callguard_result")
    assert actions[1] == ("set", "callguard_direction=outbound")
    assert actions[2] == ("socket", "127.0.0.1:8084 async full")
    assert actions[3] == ("transfer", "${destination_number} XML callguard_checked")
    assert apps[-1] != "socket"


def test_socket_connects_where_callguard_listens_by_default(dialplan):
    [data] = [d for a, d in dialplan.hunt(METERED, {"destination_number": NUMBER}, {})
              if a == "socket"]
    assert data.split()[0] == Settings().esl_bind


def test_checked_context_bridges_only_on_allow(dialplan):
    fields = {"destination_number": NUMBER}
    assert dialplan.hunt(CHECKED, fields, {"callguard_result": "ALLOW"}) == [
        ("bridge", f"sofia/gateway/carrier/{NUMBER}")]
    for variables in ({}, {"callguard_result": ""}, {"callguard_result": "DENY"},
                      {"callguard_result": "UNAVAILABLE"}, {"callguard_result": "ALLOWED"},
                      {"callguard_result": "allow"}):
        assert dialplan.hunt(CHECKED, fields, variables) == [
            ("hangup", "NORMAL_TEMPORARY_FAILURE")], variables


def run_call(dialplan, callguard, variables=None, number=NUMBER):
    """Run a call from the metered context the way FreeSWITCH 1.10.12 was recorded doing it.
    `callguard(variables)` stands for the outbound socket: None when nothing listens,
    else a hangup cause or "" to let the dialplan go on.  Returns the call's end."""
    fields = {"destination_number": number, "context": METERED}
    variables = dict(variables or {})
    for _ in range(5):
        for app, data in dialplan.hunt(fields["context"], fields, variables):
            data = expand(data, ChainMap(variables, fields))
            if app == "unset":
                variables.pop(data, None)
            elif app == "set":
                name, _, value = data.partition("=")
                variables[name] = value
            elif app == "socket":
                cause = callguard(variables)  # None: connection refused, fail open
                if cause:
                    return ("hangup", cause)
            elif app == "transfer":
                dest, kind, context = data.split()
                assert kind == "XML"
                fields = {**fields, "destination_number": dest, "context": context}
                break
            elif app in ("bridge", "hangup"):
                return (app, data)
            else:
                raise AssertionError(f"{app} is not modelled")
        else:
            return ("hangup", "NORMAL_CLEARING")  # ran out of actions
    raise AssertionError("the dialplan loops")


def answer(**values):
    def callguard(variables):
        variables.update(values)
        return "CALL_REJECTED" if values.get("callguard_result") == "DENY" else ""
    return callguard


def test_a_call_callguard_allows_is_bridged(dialplan):
    assert run_call(dialplan, answer(callguard_result="ALLOW")) == (
        "bridge", f"sofia/gateway/carrier/{NUMBER}")


def test_a_call_callguard_denies_is_hung_up(dialplan):
    assert run_call(dialplan, answer(callguard_result="DENY")) == ("hangup", "CALL_REJECTED")


def test_without_callguard_the_call_fails_closed(dialplan):
    assert run_call(dialplan, lambda v: None) == ("hangup", "NORMAL_TEMPORARY_FAILURE")
    # socket ended without a result (something else on 8084, or a crash mid-call)
    assert run_call(dialplan, answer()) == ("hangup", "NORMAL_TEMPORARY_FAILURE")


def test_a_result_left_on_the_channel_never_passes_for_an_answer(dialplan):
    end = run_call(dialplan, lambda v: None, variables={"callguard_result": "ALLOW"})
    assert end == ("hangup", "NORMAL_TEMPORARY_FAILURE")


def test_callguard_sees_an_outbound_call(dialplan):
    seen = {}
    run_call(dialplan, lambda v: seen.update(v), variables={"callguard_direction": "inbound"})
    assert seen["callguard_direction"] == "outbound"


# --- the interpreter -----------------------------------------------------------------------


def load(tmp_path, body: str, root: str = "include") -> Dialplan:
    path = tmp_path / "dialplan.xml"
    if root == "document":
        body = (f'<document type="freeswitch/xml"><section name="dialplan">{body}'
                "</section></document>")
    else:
        body = f"<include>{body}</include>"
    path.write_text(body)
    return Dialplan.load(path)


def test_anti_actions_run_when_a_condition_fails(tmp_path):
    plan = load(tmp_path, """<context name="c"><extension name="e">
        <condition field="destination_number" expression="^1$">
          <action application="a" data="yes"/><anti-action application="b" data="no"/>
        </condition></extension></context>""")
    assert plan.hunt("c", {"destination_number": "1"}, {}) == [("a", "yes")]
    assert plan.hunt("c", {"destination_number": "2"}, {}) == [("b", "no")]


def test_a_failing_condition_breaks_the_extension_by_default(tmp_path):
    plan = load(tmp_path, """<context name="c"><extension name="e">
        <condition field="destination_number" expression="^1$">
          <anti-action application="anti1"/></condition>
        <condition field="caller_id_number" expression="^9$">
          <action application="a2"/><anti-action application="anti2"/></condition>
        </extension><extension name="next">
        <condition><action application="fallback"/></condition></extension></context>""")
    # first fails: its anti-action, the second is never evaluated, the hunt goes on
    assert plan.hunt("c", {"destination_number": "2", "caller_id_number": "9"}, {}) == [
        ("anti1", ""), ("fallback", "")]
    # both pass: the extension matched, the hunt stops
    assert plan.hunt("c", {"destination_number": "1", "caller_id_number": "9"}, {}) == [
        ("a2", "")]


def test_break_never_and_on_true(tmp_path):
    plan = load(tmp_path, """<context name="c"><extension name="e">
        <condition field="destination_number" expression="^1$" break="never">
          <action application="one"/><anti-action application="not_one"/></condition>
        <condition field="destination_number" expression="^\\d$" break="on-true">
          <action application="digit"/></condition>
        <condition><action application="never_reached"/></condition>
        </extension></context>""")
    assert plan.hunt("c", {"destination_number": "2"}, {}) == [("not_one", ""), ("digit", "")]
    assert plan.hunt("c", {"destination_number": "1"}, {}) == [("one", ""), ("digit", "")]


def test_continue_true_goes_on_to_the_next_extension(tmp_path):
    plan = load(tmp_path, """<context name="c">
        <extension name="log" continue="true"><condition>
          <action application="log" data="x"/></condition></extension>
        <extension name="route"><condition><action application="route"/></condition></extension>
        <extension name="unreached"><condition><action application="no"/></condition></extension>
        </context>""")
    assert plan.hunt("c", {}, {}) == [("log", "x"), ("route", "")]


def test_captures_are_substituted_into_that_conditions_actions_only(tmp_path):
    plan = load(tmp_path, """<context name="c"><extension name="e">
        <condition field="destination_number" expression="^00(\\d\\d)(\\d+)$">
          <action application="a" data="cc=$1 rest=${2} none=$7 keep=${var} $x"/></condition>
        <condition field="caller_id_number" expression="^\\d+$">
          <action application="b" data="$1"/></condition>
        </extension></context>""", root="document")
    assert plan.hunt("c", {"destination_number": "0041791234567", "caller_id_number": "5"},
                     {}) == [("a", "cc=41 rest=791234567 none= keep=${var} $x"), ("b", "$1")]


def test_variable_conditions_and_expressions(tmp_path):
    plan = load(tmp_path, """<context name="c"><extension name="e">
        <condition field="${who}" expression="^${expected}$">
          <action application="yes" data="${who}"/><anti-action application="no"/>
        </condition></extension></context>""")
    assert plan.hunt("c", {}, {"who": "alice", "expected": "alice"}) == [("yes", "${who}")]
    assert plan.hunt("c", {}, {"who": "bob", "expected": "alice"}) == [("no", "")]
    # both expand to "": field "" against "^$" matches, as in FreeSWITCH
    assert plan.hunt("c", {}, {}) == [("yes", "${who}")]
    # ${var} falls back to the caller profile, a channel variable wins over it
    plan = load(tmp_path, """<context name="c"><extension name="e">
        <condition field="${destination_number}" expression="^1$">
          <action application="yes"/></condition></extension></context>""")
    assert plan.hunt("c", {"destination_number": "1"}, {}) == [("yes", "")]
    assert plan.hunt("c", {"destination_number": "1"}, {"destination_number": "2"}) == []


def test_unknown_fields_are_empty_and_no_match_is_no_route(tmp_path):
    plan = load(tmp_path, """<context name="c"><extension name="e">
        <condition field="no_such_field" expression="^$"><action application="empty"/>
        </condition></extension><extension name="f">
        <condition field="destination_number" expression="^1$"><action application="x"/>
        </condition></extension></context>""")
    assert plan.hunt("c", {}, {}) == [("empty", "")]
    plan = load(tmp_path, """<context name="c"><extension name="f">
        <condition field="destination_number" expression="^1$"><action application="x"/>
        </condition></extension></context>""")
    assert plan.hunt("c", {"destination_number": "2"}, {}) == []


def test_expand():
    assert expand("${a}-${b}-$1", {"a": "A"}) == "A--$1"  # captures are the hunt's job
    assert expand("${a} XML ${b}", {"a": "1", "b": "ctx"}) == "1 XML ctx"
    assert expand("${missing}", {}) == ""
    with pytest.raises(ValueError, match="not modelled"):
        expand("${uuid_getvar x y}", {})
    with pytest.raises(ValueError, match="not modelled"):
        expand("${toupper(x)}", {})


def test_unknown_context_is_an_error(dialplan):
    with pytest.raises(ValueError, match="no context 'public'.*callguard_checked"):
        dialplan.hunt("public", {}, {})


@pytest.mark.parametrize("body, message", [
    ("<context name='c'><extension name='e'>", "cannot read"),
    ("<context><extension name='e'/></context>", "needs a name"),
    ("<context name='c'/><context name='c'/>", "needs a name of its own"),
    ("<extension name='e'/>", "not modelled"),
    ("<context name='c'><extension name='e'><condition wday='1'/></extension></context>",
     "wday"),
    ("<context name='c'><extension name='e'><condition><regex field='a'/></condition>"
     "</extension></context>", "<regex>"),
    ("<context name='c'><extension name='e'><condition><action application='set' "
     "data='a=b' inline='true'/></condition></extension></context>", "inline"),
    ("<context name='c'><extension name='e'><condition><action data='x'/></condition>"
     "</extension></context>", "without an application"),
])
def test_malformed_or_unmodelled_dialplans_are_refused(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load(tmp_path, body)


def test_wrong_root_is_refused(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text("<configuration name='x'/>")
    with pytest.raises(ValueError, match="root must be"):
        Dialplan.load(path)
