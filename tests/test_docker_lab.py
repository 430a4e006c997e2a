"""The Docker lab's FreeSWITCH side (docker/compose.yaml, profile "freeswitch", and
docker/freeswitch/): files that exist, addresses, ports and passwords that agree, and
the lab's copies of the shipped FreeSWITCH files differing from them only where the
lab must.

There is no Docker engine and no FreeSWITCH here, and no YAML library in the project's
environment: compose.yaml is read by indentation, the FreeSWITCH XML by ElementTree,
the dialplan hunted by callguard.simulator.fs_dialplan.  What FreeSWITCH itself does
with these files is not tested here (docker/README.md says so).
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from callguard.adapters.esl_client import ESLClient, parse_esl_url
from callguard.adapters.freeswitch import FreeSWITCHAdapter
from callguard.config import load_settings
from callguard.simulator.fs_dialplan import Dialplan

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
LAB = DOCKER / "freeswitch"
SHIPPED_DIALPLAN = ROOT / "freeswitch_conf" / "dialplan" / "callguard.xml"
SHIPPED_ESL = ROOT / "freeswitch_conf" / "autoload_configs" / "event_socket.conf.xml"
LAB_DIALPLAN = LAB / "dialplan" / "callguard.xml"
LAB_ESL = LAB / "autoload_configs" / "event_socket.conf.xml"
METERED, CHECKED, FAREND = "callguard", "callguard_checked", "lab_farend"
NUMBER = "0900123456"
# `docker compose up` without a profile: what the lab started before FreeSWITCH came in.
DEFAULT_SERVICES = {"redis", "postgres", "migrate", "callguard", "worker", "asterisk"}
FREESWITCH_SERVICES = {"freeswitch", "callguard-fs"}


# --- compose.yaml, by indentation ----------------------------------------------------------


def compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def services() -> dict[str, list[str]]:
    """Service name -> the lines of its block (indented by 4 or more)."""
    text = compose_text()
    body = re.search(r"^services:\n(.*?)(?=^\S)", text, re.M | re.S)
    assert body, "compose.yaml has no services"
    found: dict[str, list[str]] = {}
    current = None
    for line in body[1].splitlines():
        if re.match(r"^  [A-Za-z0-9_-]+:\s*$", line):
            current = line.strip()[:-1]
            found[current] = []
        elif line.startswith("    ") and current:
            found[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            current = None
    return found


def _strip(value: str) -> str:
    value = re.sub(r"\s+#.*$", "", value).strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def section(block: list[str], key: str) -> list[str]:
    """The lines under `key:` in a service block (deeper than the key)."""
    for i, line in enumerate(block):
        match = re.match(rf"^(\s+){re.escape(key)}:\s*$", line)
        if match:
            depth = len(match[1])
            lines = []
            for following in block[i + 1:]:
                if following.strip() and (len(following) - len(following.lstrip())) <= depth:
                    break
                if following.strip() and not following.lstrip().startswith("#"):
                    lines.append(following)
            return lines
    return []


def scalar(block: list[str], key: str) -> str | None:
    for line in block:
        match = re.match(rf"^    {re.escape(key)}:\s*(\S.*)$", line)
        if match:
            return _strip(match[1])
    return None


def items(block: list[str], key: str) -> list[str]:
    return [_strip(line.strip()[2:]) for line in section(block, key)
            if line.strip().startswith("- ")]


def mapping(block: list[str], key: str) -> dict[str, str]:
    found = {}
    for line in section(block, key):
        name, _, value = line.strip().partition(":")
        if name != "<<":
            found[name] = _strip(value)
    return found


def address(name: str) -> str:
    [line] = [line for line in services()[name] if "ipv4_address:" in line]
    return line.split(":", 1)[1].strip()


def profiles(block: list[str]) -> list[str] | None:
    value = scalar(block, "profiles")
    return None if value is None else re.findall(r"\"([^\"]+)\"", value)


@pytest.fixture(scope="module")
def lab():
    return services()


def anchor(name: str) -> dict[str, str]:
    """A top-level `x-...: &name` mapping of plain `KEY: value` lines."""
    block = re.search(rf"^x-[A-Za-z0-9_-]+: &{re.escape(name)}\n((?:  .*\n)+)", compose_text(),
                      re.M)
    assert block, f"no anchor &{name}"
    return {k.strip(): _strip(v) for k, _, v in (line.partition(":") for line in
                                                   block[1].splitlines())
            if not k.strip().startswith("#")}


@pytest.fixture(scope="module")
def fs_env(lab):
    """callguard-fs's environment, with what it merges from &callguard-env."""
    env = mapping(lab["callguard-fs"], "environment")
    assert "<<: *callguard-env" in "\n".join(lab["callguard-fs"]), \
        "callguard-fs shares Redis and PostgreSQL with the rest of the lab"
    return {**anchor("callguard-env"), **env}


# --- the profile: the default `up` is unchanged ----------------------------------------------


def test_freeswitch_is_behind_its_profile_and_the_default_up_is_unchanged(lab):
    for name in FREESWITCH_SERVICES:
        assert profiles(lab[name]) == ["freeswitch"], name
    assert profiles(lab["sipp-fs"]) == ["tools"], "run on demand, as sipp"
    assert {name for name, block in lab.items() if profiles(block) is None} == DEFAULT_SERVICES
    for name in DEFAULT_SERVICES:
        needs = " ".join(section(lab[name], "depends_on"))
        for profiled in FREESWITCH_SERVICES | {"sipp-fs"}:
            assert not re.search(rf"\b{re.escape(profiled)}\b", needs), (name, profiled)


def test_every_mounted_file_exists(lab):
    for name, block in lab.items():
        for volume in items(block, "volumes"):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"


def test_fixed_addresses_are_distinct_and_on_the_lab_network(lab):
    subnet = ipaddress.ip_network(
        re.search(r"subnet:\s*([\d./]+)", compose_text())[1])
    addresses = {name: address(name) for name in lab}
    assert len(set(addresses.values())) == len(addresses), addresses
    for name, value in addresses.items():
        assert ipaddress.ip_address(value) in subnet, name


def test_freeswitch_mounts_the_lab_configuration_as_its_configuration_directory(lab):
    assert items(lab["freeswitch"], "volumes") == ["./freeswitch:/etc/freeswitch:ro"]
    assert (LAB / "freeswitch.xml").is_file()


# --- the FreeSWITCH configuration tree ------------------------------------------------------


INCLUDE = re.compile(r'<X-PRE-PROCESS cmd="include" data="([^"]+)"/>')


def included_files() -> dict[Path, str]:
    """Every file freeswitch.xml pulls in, with the tag its content must have."""
    files: dict[Path, str] = {}

    def walk(path: Path) -> None:
        for pattern in INCLUDE.findall(path.read_text(encoding="utf-8")):
            directory = (path.parent / pattern).parent.resolve()
            for found in sorted(directory.glob(Path(pattern).name)):
                files[found] = found.parent.name
                walk(found)

    walk(LAB / "freeswitch.xml")
    return files


ROOTS = {"autoload_configs": "configuration", "dialplan": "include",
         "directory": "include", "sip_profiles": "profile"}


def test_every_lab_file_is_loaded_and_well_formed():
    files = included_files()
    on_disk = {p.resolve() for p in LAB.rglob("*") if p.is_file()} - {
        (LAB / "freeswitch.xml").resolve()}
    assert set(files) == on_disk, "a file FreeSWITCH would not read, or one that is missing"
    for path, kind in files.items():
        root = ET.parse(path).getroot()  # expat: also rejects "--" inside comments
        assert root.tag == ROOTS[kind], path
        text = path.read_text(encoding="utf-8")
        # The preprocessor works on raw lines, comments included.
        assert "$${" not in text, path
        assert not text.startswith("<?xml"), "included files carry no XML declaration"
        if path.name != "sofia.conf.xml":
            assert "x-pre-process" not in text.lower(), path


def configuration(name: str) -> ET.Element:
    [root] = [ET.parse(p).getroot() for p in (LAB / "autoload_configs").glob("*.xml")
              if ET.parse(p).getroot().get("name") == name]
    return root


def params(element: ET.Element) -> dict[str, str]:
    found = {}
    for param in element.iter("param"):
        assert param.get("name") not in found, f"{param.get('name')} given twice"
        found[param.get("name")] = param.get("value")
    return found


# Applications and endpoints the lab's dialplan uses -> the module that provides them.
PROVIDERS = {"socket": "mod_event_socket", "set": "mod_dptools", "unset": "mod_dptools",
             "transfer": "mod_dptools", "bridge": "mod_dptools", "hangup": "mod_dptools",
             "ring_ready": "mod_dptools", "sleep": "mod_dptools", "answer": "mod_dptools",
             "playback": "mod_dptools", "loopback/": "mod_loopback",
             "tone_stream://": "mod_tone_stream"}


def test_the_modules_the_lab_needs_are_loaded():
    loaded = [m.get("module") for m in configuration("modules.conf").iter("load")]
    assert len(loaded) == len(set(loaded))
    # callguard's api commands (uuid_kill, sched_hangup, show channels, ...) and the
    # dialplan XML; SIP; the console the log goes to.
    assert {"mod_commands", "mod_dialplan_xml", "mod_sofia", "mod_console"} <= set(loaded)
    for path in (LAB / "dialplan").glob("*.xml"):
        for action in ET.parse(path).getroot().iter():
            if action.tag in ("action", "anti-action"):
                app, data = action.get("application"), action.get("data", "")
                assert PROVIDERS[app] in loaded, app
                for prefix, module in PROVIDERS.items():
                    if prefix.endswith(("/", "//")) and prefix in data:
                        assert module in loaded, data


# --- the lab's copies of the shipped files ----------------------------------------------------


def differences(shipped: ET.Element, lab: ET.Element, where: str = "") -> list:
    """(where, attribute, shipped value, lab value) for every attribute that differs;
    any other difference in structure fails."""
    assert (shipped.tag, len(shipped)) == (lab.tag, len(lab)), where
    assert set(shipped.attrib) == set(lab.attrib), where
    found = [(f"{where}/{shipped.tag}", key, shipped.get(key), lab.get(key))
             for key in shipped.attrib if shipped.get(key) != lab.get(key)]
    for a, b in zip(shipped, lab, strict=True):
        found += differences(a, b, f"{where}/{shipped.tag}[{shipped.get('name', '')}]")
    return found


def test_lab_dialplan_is_the_shipped_one_with_only_socket_and_bridge_changed(lab, fs_env):
    changed = differences(ET.parse(SHIPPED_DIALPLAN).getroot(), ET.parse(LAB_DIALPLAN).getroot())
    assert [(old, new) for _, key, old, new in changed if key == "data"] == [
        ("127.0.0.1:8084 async full", f"{address('callguard-fs')}:8084 async full"),
        ("sofia/gateway/carrier/$1", f"loopback/$1/{FAREND}")]
    assert all(key == "data" for _, key, _, _ in changed), changed
    host, port = fs_env["CALLGUARD_ESL_BIND"].rsplit(":", 1)
    assert host == "0.0.0.0" and port == "8084"


@pytest.fixture(scope="module")
def dialplan():
    return Dialplan.load(LAB_DIALPLAN, LAB / "dialplan" / "lab.xml")


def test_lab_dialplan_asks_callguard_fs_then_bridges_to_a_far_end_that_answers(dialplan):
    fields = {"destination_number": NUMBER}
    actions = dialplan.hunt(METERED, fields, {})
    assert [a for a, _ in actions] == ["unset", "set", "socket", "transfer"]
    assert actions[2] == ("socket", f"{address('callguard-fs')}:8084 async full")
    assert dialplan.hunt(CHECKED, fields, {"callguard_result": "ALLOW"}) == [
        ("bridge", f"loopback/{NUMBER}/{FAREND}")]
    assert dialplan.hunt(CHECKED, fields, {}) == [("hangup", "NORMAL_TEMPORARY_FAILURE")]
    far = dialplan.hunt(FAREND, fields, {})
    assert [a for a, _ in far] == ["ring_ready", "sleep", "answer", "playback"]
    assert far[-1][1].endswith(";loops=-1"), "the far end never hangs up by itself"
    assert "hangup" not in [a for a, _ in far]


def test_lab_event_socket_is_the_shipped_one_with_address_acl_and_password_changed(fs_env):
    shipped, lab = params(ET.parse(SHIPPED_ESL).getroot()), params(ET.parse(LAB_ESL).getroot())
    assert set(shipped) == set(lab)
    assert {k for k in shipped if shipped[k] != lab[k]} == {
        "listen-ip", "password", "apply-inbound-acl"}
    host, port, password = parse_esl_url(fs_env["CALLGUARD_ESL_URL"])
    assert (host, str(port), password) == (lab["listen-ip"], lab["listen-port"], lab["password"])
    assert host == address("freeswitch")
    assert password.lower() != "cluecon" and "CHANGE" not in password


def acl_lists() -> dict[str, ET.Element]:
    return {lst.get("name"): lst for lst in configuration("acl.conf").iter("list")}


def acl_allows(lst: ET.Element, peer: str) -> bool:
    """The cidr nodes of a list (the most specific match wins, as switch_core does)."""
    best = None
    for node in lst.iter("node"):
        if node.get("cidr"):
            net = ipaddress.ip_network(node.get("cidr"))
            if ipaddress.ip_address(peer) in net and (best is None or
                                                       net.prefixlen > best[0].prefixlen):
                best = (net, node.get("type") == "allow")
    return best[1] if best else lst.get("default") == "allow"


def test_only_callguard_fs_and_freeswitch_itself_may_log_in_to_the_event_socket(lab):
    lst = acl_lists()[params(ET.parse(LAB_ESL).getroot())["apply-inbound-acl"]]
    assert lst.get("default") == "deny"
    assert acl_allows(lst, address("callguard-fs"))
    assert acl_allows(lst, address("freeswitch"))  # fs_cli, the healthcheck
    for name in set(lab) - {"callguard-fs", "freeswitch"}:
        assert not acl_allows(lst, address(name)), name


def test_healthcheck_logs_in_the_way_the_event_socket_admits(lab):
    [test] = [line for line in lab["freeswitch"] if line.strip().startswith("test:")]
    esl = params(ET.parse(LAB_ESL).getroot())
    assert f"-H {esl['listen-ip']} -P {esl['listen-port']} -p {esl['password']}" in test


def test_callguard_fs_settings_load_and_admit_only_freeswitch(lab, fs_env):
    settings = load_settings(env=fs_env)
    assert settings.esl_url and settings.node == "callguard-fs"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.database_url and settings.database_url.startswith("postgresql")
    assert scalar(lab["callguard-fs"], "hostname") == "callguard-fs"
    assert scalar(lab["callguard-fs"], "command") == '["callguard", "-v", "serve", "freeswitch"]'
    allowed = [ipaddress.ip_network(n) for n in settings.esl_allow]
    assert any(ipaddress.ip_address(address("freeswitch")) in n for n in allowed)
    for name in ("sipp", "sipp-fs", "asterisk"):
        assert not any(ipaddress.ip_address(address(name)) in n for n in allowed), name


# --- SIPp -> FreeSWITCH -> callguard with the account of the Asterisk side ------------------


def directory_users() -> dict[str, ET.Element]:
    root = ET.parse(LAB / "directory" / "lab.xml").getroot()
    return {f"{user.get('id')}@{domain.get('name')}": user
            for domain in root.iter("domain") for user in domain.iter("user")}


def variables(user: ET.Element) -> dict[str, str]:
    return {v.get("name"): v.get("value") for v in user.iter("variable")}


def test_sipp_fs_calls_the_lab_profile_and_is_its_directory_user(lab):
    command = items(lab["sipp-fs"], "command")
    target = command[-1]
    assert target == f"{address('freeswitch')}:5060"
    assert command[command.index("-i") + 1] == address("sipp-fs")
    assert command[command.index("-s") + 1] == NUMBER
    assert command[:command.index("-i")] == items(lab["sipp"], "command")[:command.index("-i")]

    [profile] = [ET.parse(p).getroot() for p in (LAB / "sip_profiles").glob("*.xml")]
    settings = params(profile)
    assert f"{settings['sip-ip']}:{settings['sip-port']}" == target
    assert settings["auth-calls"] == "true" and settings["auth-calls-acl-only"] == "true"
    assert settings["context"] == METERED  # a call without a user context is metered too

    lst = acl_lists()[settings["apply-inbound-acl"]]
    assert lst.get("default") == "deny"
    domains = {node.get("domain") for node in lst.iter("node") if node.get("domain")}
    callers = {token: user for token, user in directory_users().items()
               if token.split("@")[1] in domains and user.get("cidr")}
    [(token, user)] = [(t, u) for t, u in callers.items()
                       if any(ipaddress.ip_address(address("sipp-fs")) in
                              ipaddress.ip_network(c) for c in u.get("cidr").split(","))]
    assert not acl_allows(lst, address("sipp-fs")), "admitted as the user, not by a cidr node"
    values = variables(user)
    assert values["user_context"] == METERED
    pjsip = (DOCKER / "asterisk" / "pjsip.conf").read_text()
    assert f"accountcode = {values['accountcode']}" in pjsip, "one account for both PBXs"


# --- the README -----------------------------------------------------------------------------


def test_readme_tells_how_to_start_it_and_what_the_log_says(fs_env):
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "docker compose --profile freeswitch up -d" in readme
    assert "docker compose run --rm sipp-fs" in readme
    # the lines callguard logs (adapters/link.py, adapters/common.py serve())
    assert f"{ESLClient.protocol} logged in" in readme
    bind = fs_env["CALLGUARD_ESL_BIND"]
    assert f"serving {FreeSWITCHAdapter.setup_protocol} on {bind}" in readme
    assert "has **not been" in readme and "run**" in readme


def test_every_lab_address_in_the_freeswitch_files_is_a_service_of_the_lab(lab):
    known = {address(name) for name in lab}
    for path in LAB.rglob("*.xml"):
        for found in re.findall(r"\b172\.28\.0\.\d+\b(?!/24)", path.read_text(encoding="utf-8")):
            assert found in known, f"{path.relative_to(ROOT)}: {found}"

