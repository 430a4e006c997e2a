"""`callguard audit passwords`: the seed's password policy over Asterisk pjsip.conf and
FreeSWITCH directory XML. Each rule; templates, includes (glob, cycle), comments; $${var}
from vars.xml; exit 0/1/2; and no secret ever in what it prints. No Redis, no SQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from callguard import service
from callguard.audit import check
from callguard.cli import cli

from conftest import FIXTURES

AUDIT = FIXTURES / "audit"
AST = AUDIT / "asterisk"
FS = AUDIT / "freeswitch"

# Every secret in the fixtures, to make sure none is ever printed.
SECRETS = ["oldgone", "Gk4#Zp2", "Tq7#;wLx9", "Carla#9Vrxq2", "Vr#9xqWERTz!",
           "Vr#9xkkkkLp2", "Hq8%Tz3!Wn5b", "Fn2!Mc8@Wk4q", "Zk2!3210Pq", "marmot88quokka",
           "Nw6&Ry2$Ja9k", "Gk4#Zp2x", "Dm4$Qr8!Tx2w", "Jb3@Xw7#Rt5y", "Pl7&aaaaWq2", "Yt6!",
           "oops1"]


@pytest.fixture
def audit(tmp_path, monkeypatch):
    """The CLI with no books and no Redis to open: the audit must not touch them."""
    def unavailable(self):
        raise AssertionError("the audit opened the books or Redis")

    monkeypatch.setattr(service.App, "books", property(unavailable))
    monkeypatch.setattr(service.App, "redis", property(unavailable))
    env = {"CALLGUARD_HOME": str(tmp_path / "home"), "CALLGUARD_CONFIG": None,
           "CALLGUARD_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",
           "CALLGUARD_REDIS_URL": "redis://127.0.0.1:1/0"}

    def invoke(*args):
        return CliRunner().invoke(cli, ["audit", "passwords", *map(str, args)], env=env,
                                  catch_exceptions=False)

    return invoke


def failures(result) -> dict[tuple[str, int, str], list[str]]:
    """(file relative to the fixtures, line, user) -> rules, from --json output."""
    return {(Path(f["file"]).relative_to(AUDIT).as_posix(), f["line"], f["user"]): f["rules"]
            for f in json.loads(result.stdout)["failures"]}


def line_of(path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def unreadable(result, *words) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("callguard: "), result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


# -- the rules -------------------------------------------------------------------------

@pytest.mark.parametrize("secret", [
    "Xy7#kq9!Lm", "Tq7#;wLx9", "Hq8%Tz3!Wn5b", "gk4#zp2qw9",  # 3 kinds of 4 are enough
    "Rt5$ab1!Zx", "Pq8!aaa2Lm", "Mx3!1245Kz", "Wq9!qwe7Tz",  # 3 in a row, or out of order
])
def test_a_good_secret_breaks_no_rule(secret):
    assert check(secret, "1000") == {}


@pytest.mark.parametrize("secret, user, rule, detail", [
    ("Gk4#Zp2", "", "too_short", "7 < 9"),
    ("", "", "too_short", "0 < 9"),
    ("marmot88quokka", "", "too_few_classes", "2 of 4 kinds, needs 3"),
    ("MARMOT-QUOKKA", "", "too_few_classes", "2 of 4 kinds, needs 3"),
    ("Vr#9x1234Lp", "", "sequence", ""),  # digits
    ("Vr#9x4321Lp", "", "sequence", ""),  # descending
    ("Vr#9xaBcDLp", "", "sequence", ""),  # the alphabet, whatever the case
    ("Vr#9xZYXWp", "", "sequence", ""),
    ("Vr#9xqWERp", "", "sequence", ""),  # the qwerty row
    ("Vr#9xtrewp", "", "sequence", ""),
    ("Vr#9LKJHg2", "", "sequence", ""),  # asdf, backwards
    ("Vr#9xcvbP", "", "sequence", ""),  # zxcv
    ("Vr#9rtzuP", "", "sequence", ""),  # qwertz: the Swiss and German keyboard
    ("Vr#9yxcvP", "", "sequence", ""),
    ("Vr#97890P", "", "sequence", ""),  # the digit row
    ("Vr#9xkkkkLp2", "", "repeated", ""),
    ("Vr#9x7777Lp", "", "repeated", ""),
    ("Vr#9xaAaALp", "", "repeated", ""),
    ("Carla#9Vrxq2", "carla", "contains_user", ""),
    ("Vr#9x41441Lp", "41441", "contains_user", ""),
])
def test_each_rule(secret, user, rule, detail):
    broken = check(secret, user)
    assert rule in broken and broken[rule] == detail
    if secret:
        assert list(broken) == [rule], broken  # the fixture breaks that rule alone


def test_a_short_user_name_is_not_looked_for():
    assert check("Vr#9x41Lpq", "41") == {}


# -- Asterisk ----------------------------------------------------------------------------

def test_pjsip_conf_templates_includes_comments(audit):
    result = audit(AST / "pjsip.conf", "--json")
    assert result.exit_code == 1, result.output
    conf = AST / "pjsip.conf"
    assert failures(result) == {
        # the template's password line, for the section that uses the template
        ("asterisk/pjsip.conf", line_of(conf, "password => Gk4#Zp2"), "102"): ["too_short"],
        ("asterisk/pjsip.conf", line_of(conf, "Carla#9"), "carla"): ["contains_user"],
        ("asterisk/pjsip.conf", line_of(conf, "Vr#9xqWERTz!"), "103"): ["sequence"],
        # no password at all: the section's line
        ("asterisk/pjsip.conf", line_of(conf, "[104]"), "104"): ["too_short",
                                                                 "too_few_classes"],
        ("asterisk/pjsip.d/office.conf", 4, "200"): ["repeated"],  # a glob #include
        ("asterisk/trunks/carrier-backup.conf", 4, "backup"): ["sequence"],  # nested include
    }
    data = json.loads(result.stdout)
    # 100 ("\;" in it), 201, carrier pass; the commented-out block and the template are none
    assert data["summary"] == {"files": 5, "secrets": 9, "failed": 6, "passed": 3}
    assert data["failures"][0]["section"] == "102"
    assert data["failures"][0]["details"] == {"too_short": "7 < 9"}
    assert [n for n in data["notes"] if "auth_type=md5" in n and "[2000]" in n]
    assert [n for n in data["notes"] if "password_digest" in n and "[digest-only]" in n]


def test_human_output_says_file_line_user_and_rules(audit):
    result = audit(AST / "pjsip.conf")
    assert result.exit_code == 1 and result.stderr == ""
    lines, conf = result.stdout.splitlines(), AST / "pjsip.conf"
    assert lines[0] == f"{conf}:{line_of(conf, 'Gk4#Zp2')} 102: breaks too_short (7 < 9)"
    assert f"{conf}:{line_of(conf, '[104]')} 104: breaks too_short (0 < 9), too_few_classes " \
           "(0 of 4 kinds, needs 3)" in lines
    assert lines[-1] == "6 of 9 SIP secrets break the policy (5 file(s) read)"


def test_a_folder_reads_pjsip_conf_with_its_includes_and_the_other_pjsip_files(audit):
    result = audit(AST, "--json")
    assert result.exit_code == 1
    found = failures(result)
    assert found[("asterisk/pjsip_wizard.conf", 6, "300")] == ["too_few_classes"]
    assert ("asterisk/pjsip.d/office.conf", 4, "200") in found  # with pjsip.conf's template
    assert json.loads(result.stdout)["summary"]["secrets"] == 11  # wizard: in and out


def test_an_include_cycle_is_noted_and_read_once(audit):
    result = audit(AUDIT / "cycle", "--json")
    assert result.exit_code == 1
    assert failures(result) == {("cycle/pjsip.conf", 4, "a1"): ["too_short"]}
    assert any("include cycle" in n for n in json.loads(result.stdout)["notes"])


def test_all_secrets_pass_exit_0(audit, tmp_path):
    conf = tmp_path / "pjsip.conf"
    conf.write_text("[1]\ntype=auth\nusername=1000\npassword=Hq8%Tz3!Wn5b\n"
                    "#include pjsip.d/*.conf\n")
    result = audit(conf)
    assert result.exit_code == 0, result.output
    assert "note: " in result.stdout and "matches no file" in result.stdout
    assert result.stdout.splitlines()[-1] == "all 1 SIP secrets pass the policy (1 file(s) read)"


def test_a_missing_file_or_include_is_exit_2(audit, tmp_path):
    unreadable(audit(tmp_path / "nope.conf"), "nope.conf", "no such file")
    unreadable(audit(AUDIT / "missing"), "pjsip.conf:5", "#include gone.conf", "no such file")
    unreadable(audit(tmp_path), "nothing to audit")


def test_a_folder_in_place_of_an_included_file_is_exit_2(audit, tmp_path):
    """Root reads a chmod 000 file all the same: a folder cannot be read by anyone."""
    (tmp_path / "users.conf").mkdir()
    conf = tmp_path / "pjsip.conf"
    conf.write_text("[1]\ntype=auth\npassword=Hq8%Tz3!Wn5b\n#include users.conf\n")
    unreadable(audit(conf), "cannot read", "users.conf")
    unreadable(audit(AST / "pjsip.conf", tmp_path / "users.conf" / "x.xml"), "x.xml")


def test_usage_without_a_path_is_exit_2(audit):
    result = audit()
    assert result.exit_code == 2 and "Missing argument" in result.stderr


# -- FreeSWITCH --------------------------------------------------------------------------

def test_freeswitch_directory_folder(audit):
    result = audit(FS / "directory", "--json")
    assert result.exit_code == 1
    assert failures(result) == {
        # $${default_password}, set to 1234 in the vars.xml of the conf folder above
        ("freeswitch/directory/default/1000.xml", 4, "1000"): ["too_short",
                                                              "too_few_classes", "sequence"],
        ("freeswitch/directory/default/1001.xml", 6, "rev1001"): ["repeated"],
        ("freeswitch/directory/default/1002.xml", 4, "1002"): ["unresolved_variable"],
    }
    data = json.loads(result.stdout)
    # 1000, 1001's password and reverse-auth-pass, 1002, 1003 (its domain's); vm-password
    # is no SIP secret
    assert data["summary"] == {"files": 6, "secrets": 5, "failed": 3, "passed": 2}
    assert data["failures"][2]["details"] == {"unresolved_variable": "$${not_set_anywhere}"}


def test_a_freeswitch_file_finds_vars_xml_above_it(audit):
    result = audit(FS / "directory" / "default" / "1000.xml")
    assert result.exit_code == 1
    assert "1000.xml:4 1000: breaks too_short (4 < 9)" in result.stdout


def test_without_vars_xml_a_variable_is_reported_not_passed(audit, tmp_path):
    user = tmp_path / "1000.xml"
    user.write_text((FS / "directory" / "default" / "1000.xml").read_text())
    result = audit(user)
    assert result.exit_code == 1
    assert "breaks unresolved_variable ($${default_password})" in result.stdout


def test_xml_with_a_doctype_is_refused(audit, tmp_path):
    unreadable(audit(AUDIT / "doctype.xml"), "doctype.xml", "DOCTYPE")
    broken = tmp_path / "broken.xml"
    broken.write_text("<include><user id='1'>\n</include>")
    unreadable(audit(broken), "not well-formed", "line 2")


# -- secrets stay secret -----------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [AST], [AST, "--json"], [FS], [FS, "--json"], [AUDIT / "cycle", "--json"],
])
def test_no_secret_is_ever_printed(audit, args):
    result = audit(*args)
    assert result.exit_code == 1
    for secret in SECRETS:  # nor a part of one: any 5 characters of it in a row
        for part in {secret[i:i + 5] for i in range(max(1, len(secret) - 4))}:
            assert part not in result.stdout and part not in result.stderr, secret
    assert "1234" not in result.stdout  # $${default_password}'s value either


def test_no_secret_in_the_debug_log(tmp_path, caplog):
    caplog.set_level("DEBUG")
    result = CliRunner().invoke(cli, ["-vv", "--home", str(tmp_path), "audit", "passwords",
                                      str(AST), str(FS)])
    assert result.exit_code == 1
    logged = result.output + caplog.text
    for secret in SECRETS:
        assert secret not in logged, secret
