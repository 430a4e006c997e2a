"""The Docker lab's FreeSWITCH side (docker/compose.yaml, profile "freeswitch", and
docker/freeswitch/): files that exist, addresses, ports and passwords that agree, and
the lab's copies of the shipped FreeSWITCH files differing from them only where the
lab must.  And what docker/README.md and docker/lab/run-native.md claim about the
Asterisk side that the files can show: the modules an image must load (every
application and function the dialplan uses), the SIPp command lines (as compose.yaml
runs them, each with the -i its PBX identifies SIPp by), and the native run's edits,
applied to the lab's files.

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

from callguard.adapters.ami_client import parse_ami_url
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


# --- the Asterisk side: the modules an image must load ----------------------------------------


ASTERISK_DIALPLAN = [DOCKER / "asterisk" / "extensions.conf",
                     ROOT / "dialplan" / "asterisk" / "callguard.conf"]
PJSIP = DOCKER / "asterisk" / "pjsip.conf"
README = DOCKER / "README.md"
NATIVE = DOCKER / "lab" / "run-native.md"
FRAUD = DOCKER / "sipp" / "fraud.xml"
# Dialplan applications -> the module that registers them; None: Asterisk's core
# (main/pbx_builtins.c, main/pbx_variables.c).
APPLICATIONS = {"Gosub": "app_stack", "Return": "app_stack", "Dial": "app_dial",
                "Milliwatt": "app_milliwatt", "ExecIf": "app_exec", "Log": "app_verbose",
                "AGI": "res_agi", "NoOp": None, "Set": None, "Goto": None, "GotoIf": None,
                "Hangup": None, "Ringing": None, "Wait": None, "Answer": None}
FUNCTIONS = {"CHANNEL": "func_channel", "URIENCODE": "func_uri", "LEN": "func_strings",
             "FILTER": "func_strings", "DIALPLAN_EXISTS": "func_dialplan",
             "LOCAL": "app_stack", "TIMEOUT": "func_timeout", "CDR": "func_cdr"}
CHANNEL_TECHS = {"Local": None, "PJSIP": "chan_pjsip"}  # core_local is in the core
PJSIP_TYPES = {"transport": "res_pjsip", "endpoint": "chan_pjsip",
               "identify": "res_pjsip_endpoint_identifier_ip"}
CODECS = {"ulaw": "codec_ulaw"}
PRIORITY = re.compile(r"^\s*(?:exten\s*=>\s*[^,]+,\s*[^,]+|same\s*=>\s*[^,]+),\s*(\w+)\((.*)$")


def dialplan_lines() -> list[str]:
    lines = []
    for path in ASTERISK_DIALPLAN:
        for line in path.read_text(encoding="utf-8").splitlines():
            code = line.split(";", 1)[0]  # neither file escapes a ';'
            if code.strip():
                lines.append(code)
    return lines


def applications_used() -> set[str]:
    found = set()
    for line in dialplan_lines():
        match = PRIORITY.match(line)
        if match:
            found.add(match[1])
            if match[1] == "ExecIf":
                found.update(re.findall(r"\?(\w+)\(", match[2]))
    assert {"AGI", "Gosub", "Dial", "Milliwatt"} <= found, "the parser lost the dialplan"
    return found


def functions_used() -> set[str]:
    found = set()
    for line in dialplan_lines():
        found.update(re.findall(r"\$\{([A-Z][A-Z_]*)\(", line))
        found.update(re.findall(r"\bSet\(([A-Z][A-Z_]*)\(", line))
    # What callguard itself asks of Asterisk: it sets TIMEOUT(absolute) over FastAGI and
    # reads CDR(answer,u) over AMI.
    adapter = (ROOT / "callguard" / "adapters" / "asterisk.py").read_text(encoding="utf-8")
    for expression in ("TIMEOUT(absolute)", "CDR(answer,u)"):
        assert f'"{expression}"' in adapter, expression
        found.add(expression.split("(")[0])
    return found


def pjsip_sections() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in PJSIP.read_text(encoding="utf-8").splitlines():
        line = line.split(";", 1)[0].strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and current is not None:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


def required_modules() -> set[str]:
    modules = set()
    for app in applications_used():
        assert app in APPLICATIONS, f"{app}(): which module? add it here and to the README"
        modules.add(APPLICATIONS[app])
    for function in functions_used():
        assert function in FUNCTIONS, f"{function}(): which module? add it here and to the README"
        modules.add(FUNCTIONS[function])
    for line in dialplan_lines():
        for tech in re.findall(r"\bDial\((\w+)/", line):
            assert tech in CHANNEL_TECHS, tech
            modules.add(CHANNEL_TECHS[tech])
    for section in pjsip_sections().values():
        modules.add(PJSIP_TYPES[section["type"]])
        if section["type"] != "transport":
            modules.add("res_pjsip")
        for codec in section.get("allow", "").split(","):
            if codec.strip():
                modules.add(CODECS[codec.strip()])
    modules.discard(None)
    return modules


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, title
    return match[1]


def table_modules(text: str) -> list[set[str]]:
    """The module names in the first column of each table of `text`, table by table."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("| `"):
            if current is None:
                current = set()
                tables.append(current)
            current.update(re.findall(r"`([a-z]+_[a-z0-9_]+)`", line.split("|")[1]))
        elif not line.startswith("|"):
            current = None
    return tables


def test_readme_lists_every_module_the_lab_files_use():
    named, derived = table_modules(readme_section("What an Asterisk image must load"))
    required = required_modules()
    assert required == named, ("the README's first table is what the files use",
                               required - named, named - required)
    assert {"res_pjsip_session", "res_pjsip_sdp_rtp", "res_rtp_asterisk",
            "bridge_simple"} <= derived
    assert not named & derived


def test_the_native_check_loop_asks_for_every_listed_module():
    [loop] = re.findall(r"for m in (.*?); do", NATIVE.read_text(encoding="utf-8"), re.S)
    asked = set(loop.replace("\\", " ").split())
    named, derived = table_modules(readme_section("What an Asterisk image must load"))
    assert named <= asked, named - asked
    assert asked <= named | derived, asked - named - derived


# --- SIPp command lines: as they run, with -i ---------------------------------------------------


SIPP = re.compile(r"sipp -sf fraud\.xml[^`\n]*")


def sipp_lines(text: str) -> list[str]:
    return [line.strip() for line in SIPP.findall(text)]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing: {' '.join(argv)}"
    return argv[argv.index(name) + 1]


NATIVE_PAIRS = {"127.0.0.3": "127.0.0.2:5060", "127.0.0.5": "127.0.0.4:5060"}


def test_readme_and_scenario_show_the_compose_command_lines_exactly(lab):
    readme = README.read_text(encoding="utf-8")
    fraud = FRAUD.read_text(encoding="iso-8859-1")
    for name in ("sipp", "sipp-fs"):
        command = " ".join(items(lab[name], "command"))
        assert command in sipp_lines(readme), name
        assert command in sipp_lines(fraud), name


def test_every_sipp_command_line_gives_the_address_the_pbx_identifies_sipp_by(lab):
    pairs = {address("sipp"): f"{address('asterisk')}:5060",
             address("sipp-fs"): f"{address('freeswitch')}:5060", **NATIVE_PAIRS}
    texts = {README: README.read_text(encoding="utf-8"),
             FRAUD: FRAUD.read_text(encoding="iso-8859-1"),
             NATIVE: NATIVE.read_text(encoding="utf-8")}
    for path, text in texts.items():
        lines = sipp_lines(text)
        assert lines, path
        for line in lines:
            argv = line.split()
            assert pairs[option(argv, "-i")] == argv[-1], f"{path.name}: {line}"
            assert option(argv, "-sf") == "fraud.xml"
    pjsip = pjsip_sections()
    assert pjsip["sipp-identify"]["match"] == address("sipp")


# --- docker/lab/run-native.md: its edits, applied to the lab's files ----------------------------


SED_EXPR = re.compile(r"'s/((?:[^/\\]|\\.)*)/((?:[^/\\]|\\.)*)/(g?)'")


def sed_commands() -> list[tuple[list[tuple[str, str, bool]], list[str]]]:
    """(expressions, files) of every `sed -i` line of run-native.md; files [] for the
    FreeSWITCH line, which edits every file that has a lab address."""
    found = []
    for line in NATIVE.read_text(encoding="utf-8").splitlines():
        if "sed -i" not in line:
            continue
        expressions = [(old, new.replace("\\", ""), bool(g))
                       for old, new, g in SED_EXPR.findall(line)]
        assert expressions, line
        rest = SED_EXPR.sub("", line.split("sed -i", 1)[1]).replace("-e", " ").split()
        found.append((expressions, [w for w in rest if w.endswith(".conf")]))
    return found


def apply_sed(expressions, text: str) -> str:
    lines = []
    for line in text.split("\n"):
        for old, new, every in expressions:
            line = re.sub(old, lambda _m, new=new: new, line, count=0 if every else 1)
        lines.append(line)
    return "\n".join(lines)


def native_asterisk_files() -> dict[str, str]:
    files = {p.name: p.read_text(encoding="utf-8") for p in (DOCKER / "asterisk").glob("*.conf")}
    for expressions, targets in sed_commands():
        for target in targets:
            files[target] = apply_sed(expressions, files[target])
    return files


def native_freeswitch_files() -> dict[Path, str]:
    [expressions] = [e for e, targets in sed_commands() if not targets]
    return {p: apply_sed(expressions, p.read_text(encoding="utf-8"))
            for p in LAB.rglob("*.xml")}


def native_setting(name: str) -> list[str]:
    return re.findall(rf"\b{name}=(\S+)", NATIVE.read_text(encoding="utf-8"))


def test_native_asterisk_files_point_at_the_native_addresses():
    files = native_asterisk_files()
    for name, text in files.items():
        code = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
        assert not re.search(r"172\.28\.", code), f"{name} still has a lab address"
    settings = load_settings(env={})
    [server] = re.findall(r"^CALLGUARD_AGI_SERVER=(\S+)$", files["extensions.conf"], re.M)
    assert server == settings.agi_bind, "callguard's default FastAGI listener"
    host, _ = server.split(":")
    assert any(ipaddress.ip_address("127.0.0.2") in ipaddress.ip_network(n)
               for n in settings.agi_allow), "Asterisk's address is admitted by default"
    assert re.search(r"^bind = 127\.0\.0\.2:5060$", files["pjsip.conf"], re.M)
    [match] = re.findall(r"^match = (\S+)$", files["pjsip.conf"], re.M)
    assert NATIVE_PAIRS[match] == "127.0.0.2:5060"
    [bindaddr] = re.findall(r"^bindaddr = (\S+)$", files["manager.conf"], re.M)
    [url] = native_setting("CALLGUARD_AMI_URL")
    ami_host, ami_port, user, secret = parse_ami_url(url)
    assert (ami_host, ami_port, user) == (bindaddr, 5038, "callguard")
    assert f"secret = {secret}" in files["manager.conf"]
    # callguard connects from 127.0.0.1 (the source Linux picks for 127.0.0.2): the
    # shipped user already permits it, the lab's appended permit now says the same.
    assert "permit = 127.0.0.1/255.255.255.255" in files["manager.conf"]
    assert host == "127.0.0.1"


def test_native_freeswitch_files_point_at_the_native_addresses():
    files = native_freeswitch_files()
    for path, text in files.items():
        assert not re.findall(r"\b172\.28\.0\.\d+\b(?!/24)", text), path
    by_name = {p.relative_to(LAB).as_posix(): ET.fromstring(t) for p, t in files.items()}
    profile = params(by_name["sip_profiles/lab.xml"])
    esl = params(by_name["autoload_configs/event_socket.conf.xml"])
    [fs_sipp] = [line for line in sipp_lines(NATIVE.read_text(encoding="utf-8"))
                 if line.endswith(f"{profile['sip-ip']}:{profile['sip-port']}")]
    cidrs = [u.get("cidr") for u in by_name["directory/lab.xml"].iter("user")]
    assert cidrs == [f"{option(fs_sipp.split(), '-i')}/32"]
    [url] = native_setting("CALLGUARD_ESL_URL")
    assert parse_esl_url(url) == (esl["listen-ip"], int(esl["listen-port"]), esl["password"])
    sockets = [a.get("data") for a in by_name["dialplan/callguard.xml"].iter("action")
               if a.get("application") == "socket"]
    assert sockets == [f"{load_settings(env={}).esl_bind} async full"]
    nodes = {n.get("cidr") for lst in by_name["autoload_configs/acl.conf.xml"].iter("list")
             if lst.get("name") == esl["apply-inbound-acl"] for n in lst.iter("node")}
    assert "127.0.0.1/32" in nodes, "callguard connects to 127.0.0.4 from 127.0.0.1"


def test_native_processes_have_http_ports_of_their_own():
    binds = native_setting("CALLGUARD_HTTP_BIND")
    assert len(binds) == 3 and len(set(binds)) == 3, binds


def test_native_page_and_readme_predict_what_the_lab_predicts():
    native = NATIVE.read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    for text in (native, readme):
        assert "11 calls" in text and "19" in text and "NO_FUNDS" in text
        assert "callguard reconcile" in text
    assert "lab/run-native.md" in readme
    assert "## FreeSWITCH (not run)" in native
