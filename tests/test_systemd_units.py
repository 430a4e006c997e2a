"""contrib/systemd/: the units parse, carry the readiness, restart and hardening
settings the README promises, start a real callguard command, give every process its
own HTTP port, load with the example settings, and pass `systemd-analyze verify` where
that runs.  No systemd runs here as PID 1: what the units do under one is not tested."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from callguard.config import SECRETS, load_settings, split_hostport

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "contrib" / "systemd"
INSTALLED = "/opt/callguard/bin/callguard"
# unit file -> the callguard arguments after the global options
PROCESSES = {"callguard-asterisk.service": ["serve", "asterisk"],
             "callguard-freeswitch.service": ["serve", "freeswitch"],
             "callguard-worker.service": ["worker"],
             "callguard-api.service": ["api"],
             "callguard-asterisk@.service": ["serve", "asterisk"]}
HTTP_PORTS = {"callguard-asterisk.service": 9464, "callguard-worker.service": 9465,
              "callguard-freeswitch.service": 9466, "callguard-api.service": 9467}
INSTANCES = ("4574", "4575", "9999")
PER_PROCESS = {"CALLGUARD_HTTP_BIND", "CALLGUARD_AGI_BIND", "CALLGUARD_ESL_BIND",
               "CALLGUARD_NODE"}
# unit file -> the secrets it is given, beyond Redis and the books: what it uses, no more
CREDENTIALS = {"callguard-asterisk.service": {"ami_url"},
               "callguard-asterisk@.service": {"ami_url"},
               "callguard-freeswitch.service": {"esl_url"},
               "callguard-worker.service": {"smtp_url", "webhook_url", "webhook_secret",
                                            "payment_url"},
               # auto top-up needs a provider; a notice's state needs to know its channels
               "callguard-api.service": {"api_token_pepper", "payment_url", "smtp_url",
                                         "webhook_url"}}
EXAMPLE_SECRETS = {
    "redis_url": "redis://callguard:pw@127.0.0.1:6379/0",
    "database_url": "postgresql+psycopg://callguard:pw@127.0.0.1:5432/callguard",
    "ami_url": "ami://callguard:pw@127.0.0.1:5038", "esl_url": "esl://:pw@127.0.0.1:8021",
    "smtp_url": "smtp://cg:pw@mail.example.net:587?starttls=1",
    "webhook_url": "https://billing.example.net/callguard", "webhook_secret": "pw",
    "payment_url": "https://cg:pw@payments.example.net/charge",
    "api_token_pepper": "a" * 44,
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value in order (keys such as Environment= repeat; an empty
    assignment resets the list, as systemd does).  Continuation lines end with '\\'."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {p.name: parse_unit(p.read_text(encoding="utf-8"))
            for p in sorted(SYSTEMD.glob("*.service"))}


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= {values}"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span such as 20s, 5min, 1min 30s, or bare seconds."""
    scale = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * scale[unit]
    return total


def environment(unit: dict, instance: str | None = None) -> dict[str, str]:
    """The unit's Environment= assignments, with %i filled in."""
    env = {}
    for value in unit["Service"].get("Environment", []):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            env[key] = val.replace("%i", instance) if instance else val
    return env


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile=: VAR=value lines, # and ; comments."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), line
        found[key] = value.strip().strip('"')
    return found


@pytest.fixture(scope="module")
def all_units():
    found = units()
    assert set(found) == set(PROCESSES), "a unit this test does not know, or one missing"
    return found


# --- what every unit must say ---------------------------------------------------------------


HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "RestrictNamespaces": "yes",
    "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native", "UMask": "0077",
}


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_hardening(all_units, name):
    service = all_units[name]["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{name}: {key}={service.get(key)}"
    # present and empty: no capability at all
    assert "CapabilityBoundingSet" in service and service["CapabilityBoundingSet"] == []
    assert service.get("AmbientCapabilities", []) == []


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_readiness_restart_and_stop(all_units, name):
    unit = all_units[name]
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert seconds(one(unit, "Service", "RestartSec")) >= 1
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # serve finishes its commits within about 5 s, then the link (2 s); the worker joins
    # its outboxes thread for up to 15 s.
    least = 30 if name == "callguard-worker.service" else 10
    assert seconds(one(unit, "Service", "TimeoutStopSec")) >= least
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in " ".join(unit["Unit"]["After"])


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_user_state_directory_and_settings_files(all_units, name):
    service = all_units[name]["Service"]
    assert service["User"] == ["callguard"] and service["Group"] == ["callguard"]
    assert service.get("DynamicUser", ["no"]) == ["no"]
    assert service["StateDirectory"] == ["callguard"]
    assert environment(all_units[name], "4574")["CALLGUARD_HOME"] == "/var/lib/callguard"
    files = service["EnvironmentFile"]
    assert files[0] == "-/etc/callguard/callguard.env", "the shared file first, optional"
    own = name.replace("@.service", "@%i").removesuffix(".service")
    assert files[1:] == [f"-/etc/callguard/{own}.env"], "then the process's own, which wins"


# --- ExecStart is a real command ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_execstart_is_a_callguard_command_that_exists(all_units, name):
    argv = shlex.split(one(all_units[name], "Service", "ExecStart"))
    assert argv[0] == INSTALLED, "the venv under /opt/callguard (README.md)"
    options, command = argv[1:-len(PROCESSES[name])], argv[-len(PROCESSES[name]):]
    assert command == PROCESSES[name]
    assert all(o.startswith("-") for o in options), options
    run = subprocess.run([sys.executable, "-m", "callguard", *argv[1:], "--help"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CALLGUARD_HOME": "/nonexistent/callguard"})
    assert run.returncode == 0, run.stderr
    assert "Usage: callguard " + " ".join(command) in run.stdout


# --- one HTTP port per process; the example settings ------------------------------------------


def http_binds(all_units) -> dict[str, str]:
    binds = {}
    for name, unit in all_units.items():
        if "@" in name:
            for instance in INSTANCES:
                binds[name.replace("@", f"@{instance}")] = environment(
                    unit, instance)["CALLGUARD_HTTP_BIND"]
        else:
            binds[name] = environment(unit)["CALLGUARD_HTTP_BIND"]
    return binds


def test_every_process_has_its_own_http_port(all_units):
    binds = http_binds(all_units)
    ports = {name: split_hostport(bind) for name, bind in binds.items()}
    assert len(set(ports.values())) == len(ports), ports
    for name, port in HTTP_PORTS.items():
        assert ports[name] == ("127.0.0.1", port)
    assert all(host == "127.0.0.1" for host, _ in ports.values())


def test_template_instances_listen_on_the_port_they_are_named_after(all_units):
    template = all_units["callguard-asterisk@.service"]
    agi = {split_hostport(environment(template, i)["CALLGUARD_AGI_BIND"]) for i in INSTANCES}
    assert agi == {("127.0.0.1", int(i)) for i in INSTANCES}
    assert ("127.0.0.1", 4573) not in agi  # callguard-asterisk.service's default
    assert split_hostport(environment(template, "9999")["CALLGUARD_HTTP_BIND"]) == (
        "127.0.0.1", 19999), "the highest port the README allows still fits"
    for name, unit in all_units.items():
        if "@" not in name:
            assert not set(environment(unit)) & {"CALLGUARD_AGI_BIND", "CALLGUARD_ESL_BIND"}


def test_example_settings_file_shares_only_what_processes_may_share():
    shared = env_file(SYSTEMD / "callguard.env")
    assert not set(shared) & PER_PROCESS, "it would override every unit's own"
    assert shared == {"CALLGUARD_HOME": "/var/lib/callguard"}, "the rest is commented out"
    text = (SYSTEMD / "callguard.env").read_text(encoding="utf-8")
    for name, port in HTTP_PORTS.items():
        assert re.search(rf"{name.removesuffix('.service')}\s+127\.0\.0\.1:{port}\b", text)
    for name in SECRETS:  # each secret's file is named, none is set in the environment
        assert f"\n#   {name} " in text, name
        assert f"\nCALLGUARD_{name.upper()}" not in text, name


def credentials(unit: dict) -> dict[str, str]:
    """LoadCredential=ID:SOURCE -> {ID: SOURCE}."""
    pairs = [v.partition(":") for v in unit["Service"].get("LoadCredential", [])]
    assert all(sep for _, sep, _ in pairs)
    return {name: source for name, _, source in pairs}


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_each_unit_gets_its_secrets_as_credentials_it_may_start_without(all_units, name):
    given = credentials(all_units[name])
    assert set(given) == {"redis_url", "database_url"} | CREDENTIALS[name]
    for secret, source in given.items():
        # A name, not a path: systemd (252 too) looks for it in /etc/credstore/ and
        # skips it when it is not there; a missing absolute path stops the unit.
        assert source == f"callguard.{secret}" and "/" not in source
    for value in all_units[name]["Service"].get("Environment", []):
        assert not any(f"CALLGUARD_{s.upper()}=" in value for s in SECRETS), value


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_each_unit_loads_with_the_example_settings(all_units, name, tmp_path):
    """As systemd starts it: its Environment=, the shared file and its credentials."""
    store = tmp_path / "credentials"
    store.mkdir()
    for secret in credentials(all_units[name]):
        (store / secret).write_text(EXAMPLE_SECRETS[secret])
        (store / secret).chmod(0o400)
    env = {**environment(all_units[name], "4574"), **env_file(SYSTEMD / "callguard.env"),
           "CREDENTIALS_DIRECTORY": str(store)}
    settings = load_settings(env=env)
    assert str(settings.home) == "/var/lib/callguard"
    assert settings.redis_url, "the units need a Redis of their own (README.md)"
    assert settings.http_bind == http_binds(all_units)[name.replace("@", "@4574")]
    for secret in SECRETS:
        expected = EXAMPLE_SECRETS[secret] if secret in credentials(all_units[name]) else None
        assert getattr(settings, secret) == expected, secret


def test_readme_names_every_file_and_the_install_steps():
    readme = (SYSTEMD / "README.md").read_text(encoding="utf-8")
    for path in SYSTEMD.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name
    for step in ("useradd --system", "/opt/callguard", "-m 0600", "systemctl enable --now",
                 "journalctl -u", "callguard db upgrade", "READY=1", "/etc/credstore/callguard.",
                 "LoadCredential="):
        assert step in readme, step


# --- systemd-analyze ---------------------------------------------------------------------------


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed")
    return tool


def runnable_copies(all_units, directory: Path) -> list[Path]:
    """The units with ExecStart= on a program that exists here (verify checks that) and
    the template as an instance."""
    program = Path(sys.executable).with_name("callguard")
    if not program.exists():
        program = directory / "callguard"
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    copies = []
    for path in sorted(SYSTEMD.glob("*.service")):
        copy = directory / path.name.replace("@.service", "@4574.service")
        copy.write_text(path.read_text(encoding="utf-8").replace(INSTALLED, str(program)),
                        encoding="utf-8")
        copies.append(copy)
    return copies


def verify(tool: str, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([tool, "verify", "--man=no", *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_systemd_analyze_verify(all_units, tmp_path):
    tool = analyze()
    control = tmp_path / "control-known-good.service"
    control.write_text("[Unit]\nDescription=known good\n\n[Service]\nType=oneshot\n"
                       f"ExecStart={sys.executable} -c pass\n")
    checked = verify(tool, [control])
    if checked.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {checked.stderr.strip()}")
    copies = runnable_copies(all_units, tmp_path)
    result = verify(tool, copies)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_security_rates_every_unit_ok(all_units, tmp_path):
    tool = analyze()
    for copy in runnable_copies(all_units, tmp_path):
        run = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(copy)],
                             capture_output=True, text=True, timeout=120)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
        if not found:
            pytest.skip(f"systemd-analyze security --offline=yes: {run.stderr.strip()[:200]}")
        assert float(found[1]) <= 2.0, f"{copy.name}: {found[1]}\n{run.stdout}"
