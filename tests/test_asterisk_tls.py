"""AMI over TLS (`amis://`, manager.conf `tlsenable`): the simulated Asterisk speaks the
transcripts' bytes inside TLS with certificates made here by the openssl CLI; the link
checks the certificate and the host name, and refuses anything else before it sends the
secret."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import subprocess

import pytest

from callguard.adapters.ami_client import parse_ami_url
from callguard.adapters.asterisk import AsteriskAdapter
from callguard.simulator.asterisk import SimulatedAsterisk

from asterisk_rig import ACCT, PREMIUM, app_with, rig, run, until
from engine_helpers import prepaid, setup_plan, snapshot


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs ("ca", "other") and two server certificates from "ca": "asterisk" for
    127.0.0.1, "elsewhere" for pbx.example only."""
    base = tmp_path_factory.mktemp("amitls")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other"):
        _openssl("req", "-x509", *key, "-days", "2", "-subj", f"/CN=callguard test {ca}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-keyout", base / f"{ca}.key", "-out", base / f"{ca}.pem")
    for serial, (name, names) in enumerate((("asterisk", "IP:127.0.0.1"),
                                            ("elsewhere", "DNS:pbx.example")), 1):
        (base / f"{name}.ext").write_text(
            f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        _openssl("req", *key, "-subj", "/CN=asterisk", "-keyout", base / f"{name}.key",
                 "-out", base / f"{name}.csr")
        _openssl("x509", "-req", "-in", base / f"{name}.csr", "-CA", base / "ca.pem",
                 "-CAkey", base / "ca.key", "-set_serial", serial, "-days", "2",
                 "-extfile", base / f"{name}.ext", "-out", base / f"{name}.pem")
    return base


def server_tls(pki, name: str) -> ssl.SSLContext:
    """Asterisk's side: tlscertfile and tlsprivatekey."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")
    return context


@pytest.fixture
def plan(app):
    setup_plan(app)
    return app


def test_amis_urls_default_to_asterisks_tls_port():
    assert parse_ami_url("amis://callguard:s%40cret@pbx.example") == (
        "pbx.example", 5039, "callguard", "s@cret")
    assert parse_ami_url("ami://callguard:s@127.0.0.1")[1] == 5038


def test_a_call_is_supervised_end_to_end_over_amis(plan, pki):
    prepaid(plan, ACCT, balance=500_000)  # 10 s at CHF 3/min

    async def scenario():
        async with rig(plan, speed=10, ami_tls=server_tls(pki, "asterisk"),
                       ami_tls_ca=str(pki / "ca.pem")) as (sim, _):
            assert sim.ami_url.startswith("amis://")  # its AMI port speaks only TLS
            call = await sim.call(ACCT, PREMIUM, ring=1, talk=3600)
            return call, sim

    call, sim = run(scenario())
    assert [a["Action"] for a in sim.actions][:1] == ["Login"]
    # Answered (events in), cut off when its money ran out (a Hangup action out).
    assert call.cause == 16 and call.talk_seconds >= 9.5
    assert [a["Channel"] for a in sim.actions if a["Action"] == "Hangup"] == [call.channel]
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    assert -state["balance"] <= plan.settings.grace_seconds * 50_000


@pytest.mark.parametrize("server,trust,reason", [
    ("asterisk", "other", "certificate verify failed: unable to get local issuer certificate"),
    ("asterisk", None, "certificate verify failed: unable to get local issuer certificate"),
    ("elsewhere", "ca", "certificate verify failed: IP address mismatch, certificate is not "
                        "valid for '127.0.0.1'"),
    (None, "ca", "TLS handshake failed: wrong version number"),
], ids=["wrong CA", "not in the system's CAs", "wrong host name", "plain-text AMI port"])
def test_an_amis_peer_that_fails_verification_gets_no_login(plan, pki, caplog, server, trust,
                                                              reason):
    """One line naming the peer and why, no traceback; the link keeps retrying, readiness
    says it is down, calls get the failure policy, and the secret never goes out."""
    caplog.set_level(logging.WARNING, "callguard.adapters.link")

    def refusals():
        return [r for r in caplog.records if r.name == "callguard.adapters.link"]

    async def scenario():
        sim = SimulatedAsterisk(agi_port=0, ami_tls=server and server_tls(pki, server))
        await sim.start()
        url = f"amis://{sim.username}:{sim.secret}@127.0.0.1:{sim.ami_port}"
        settings = dataclasses.replace(plan.settings, ami_url=url, agi_budget_ms=2000,
                                       ami_tls_ca=trust and str(pki / f"{trust}.pem"))
        adapter = AsteriskAdapter(app_with(plan, settings))
        await adapter.start("127.0.0.1", 0)
        sim.agi_port = adapter.port
        try:
            await until(lambda: len(refusals()) >= 2, "a second attempt")
            call = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            return adapter.readiness_checks()["pbx_link"](), call, sim, sim.ami_port
        finally:
            await adapter.stop()
            await sim.stop()

    prepaid(plan, ACCT, balance=50_000_000)
    ready, call, sim, port = run(scenario())
    assert ready == "Asterisk event link is down"
    assert (call.variables["CALLGUARD_RESULT"], call.reason) == ("DENY", "UNAVAILABLE")
    assert sim.actions == []  # no Login: the secret stayed here
    for record in refusals()[:2]:
        assert record.getMessage().startswith(f"AMI 127.0.0.1:{port}: {reason}; "
                                              "reconnecting in "), record.getMessage()
        assert record.exc_info is None and sim.secret not in record.getMessage()


@pytest.mark.parametrize("url,ca,line", [
    ("amis://callguard:s3cret@127.0.0.1", "missing.pem",
     "CALLGUARD_AMI_TLS_CA {dir}/missing.pem: No such file or directory"),
    ("amis://callguard:s3cret@127.0.0.1", "junk.pem",
     "CALLGUARD_AMI_TLS_CA {dir}/junk.pem: not a PEM file of CA certificates "
     "(NO_CERTIFICATE_OR_CRL_FOUND)"),
    ("ami://callguard:s3cret@127.0.0.1", "junk.pem",
     "CALLGUARD_AMI_TLS_CA is set but CALLGUARD_AMI_URL is ami:// (plain text): use amis:// "
     "for AMI over TLS"),
])
def test_a_tls_setting_that_cannot_work_stops_serve_with_one_line(run, tmp_path, monkeypatch,
                                                                  url, ca, line):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    monkeypatch.setenv("CALLGUARD_AMI_URL", url)
    monkeypatch.setenv("CALLGUARD_AMI_TLS_CA", str(tmp_path / ca))
    result = run("serve", "asterisk")
    assert result.exit_code == 1
    assert result.output == f"callguard: {line.format(dir=tmp_path)}\n"
