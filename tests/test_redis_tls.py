"""Redis over TLS (rediss://) against a real redis-server with a TLS port that asks for a
client certificate: a test CA, the server's and the client's certificates made here with
the openssl CLI; standalone and Redis Cluster; every kind of client callguard opens (the
CLI's blocking one, serve's asyncio one and its pipelined call-path connection)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import uuid

import pytest
import redis
from click.testing import CliRunner

from callguard.cli import cli
from callguard.config import ConfigError, load_settings
from callguard.engine.connect import RedisTLS, connect, connect_async
from callguard.engine.pipelined import PipelinedRedis

from servers import free_port

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
SERVER_EXT = ("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
              "authorityKeyIdentifier=keyid\nextendedKeyUsage=serverAuth\n")
CLIENT_EXT = ("basicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid\n"
              "extendedKeyUsage=clientAuth\n")


def _openssl(*args) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.pem signs server.pem and client.pem; other-ca.pem signs nothing here."""
    base = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *EC, "-subj", f"/CN=callguard test {ca}",
                 "-keyout", base / f"{ca}.key", "-out", base / f"{ca}.pem")
    for name, ext in (("server", SERVER_EXT), ("client", CLIENT_EXT)):
        _openssl("req", *EC, "-subj", f"/CN={name}", "-keyout", base / f"{name}.key",
                 "-out", base / f"{name}.csr")
        (base / f"{name}.ext").write_text(ext)
        _openssl("x509", "-req", "-in", base / f"{name}.csr", "-CA", base / "ca.pem",
                 "-CAkey", base / "ca.key", "-CAcreateserial", "-days", "2",
                 "-extfile", base / f"{name}.ext", "-out", base / f"{name}.pem")
    return base


def client_tls(pki, ca="ca") -> RedisTLS:
    return RedisTLS(str(pki / f"{ca}.pem"), str(pki / "client.pem"), str(pki / "client.key"))


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def tls_url(request, pki, tmp_path_factory):
    """A rediss:// URL of a redis-server of these tests' own, TLS only, client certificates
    required; a one-node Redis Cluster holding every slot for "cluster"."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on the machine (the embedded one has no TLS)")
    port, cluster = free_port(), request.param == "cluster"
    tmp_path = tmp_path_factory.mktemp(request.param)
    args = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", pki / "server.pem", "--tls-key-file", pki / "server.key",
            "--tls-ca-cert-file", pki / "ca.pem", "--tls-auth-clients", "yes",
            "--dir", tmp_path, "--save", "", "--appendonly", "no"]
    if cluster:
        args += ["--cluster-enabled", "yes", "--tls-cluster", "yes",
                 "--cluster-config-file", tmp_path / "nodes.conf"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        admin = connect(f"rediss://127.0.0.1:{port}/0", client_tls(pki))
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.skip("this redis-server has no TLS")
                assert time.monotonic() < deadline, "the TLS redis-server did not start"
                time.sleep(0.05)
        if cluster:
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            while admin.cluster("info")["cluster_state"] != "ok":
                assert time.monotonic() < deadline + 10, "the cluster did not become ok"
                time.sleep(0.05)
        admin.close()
        yield f"rediss+cluster://127.0.0.1:{port}" if cluster else f"rediss://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def cli_env(tmp_path, url, tls: RedisTLS) -> dict[str, str]:
    return {"CALLGUARD_HOME": str(tmp_path / "home"), "CALLGUARD_REDIS_URL": url,
            "CALLGUARD_REDIS_TLS_CA": tls.ca, "CALLGUARD_REDIS_TLS_CERT": tls.cert,
            "CALLGUARD_REDIS_TLS_KEY": tls.key, "CALLGUARD_KEY_PREFIX": "t" + uuid.uuid4().hex[:10]}


def invoke(env, *args):
    return CliRunner().invoke(cli, list(args), env=env)


async def _ping_async(url: str, tls: RedisTLS) -> list:
    """serve's clients: the asyncio one, and on a single Redis the pipelined one."""
    client = connect_async(url, tls=tls)
    try:
        replies = [await client.ping()]
    finally:
        await client.aclose()
    if not url.startswith("rediss+cluster"):
        pipelined = PipelinedRedis(url, tls)
        try:
            replies.append(await pipelined.execute("PING"))
        finally:
            pipelined.close()
    return replies


def test_every_client_speaks_tls_with_a_client_certificate(tls_url, pki, tmp_path):
    tls = client_tls(pki)
    env = cli_env(tmp_path, tls_url, tls)
    for args in (["db", "upgrade"], ["account", "create", "41441234567", "--prepaid",
                                     "--balance", "5"]):
        done = invoke(env, *args)
        assert (done.exit_code, done.stderr) == (0, ""), args  # in Redis at once
    shown = invoke(env, "account", "show", "41441234567", "--json")
    assert '"available": "5.000000"' in shown.stdout
    assert connect(tls_url, tls).ping()
    expected = [True] if tls_url.startswith("rediss+cluster") else [True, "PONG"]
    assert asyncio.run(_ping_async(tls_url, tls)) == expected


@pytest.mark.parametrize("why", ["another CA", "no client certificate"])
def test_tls_fails_closed_in_one_line(tls_url, pki, tmp_path, why):
    """A server certificate the CA did not sign (a server in the middle) is refused by
    every client, the line naming the server; a server that asks for a client certificate
    refuses a client without (TLS 1.3 says so after the handshake: redis-py's line may
    name no server then)."""
    host = re.escape(tls_url.split("//")[1].split("/")[0])
    if why == "another CA":
        tls, expected = client_tls(pki, "other-ca"), rf"{host}. \[SSL: CERTIFICATE_VERIFY_FAIL"
    else:  # EOF, reset, or the server's alert: whichever the client meets first
        tls, expected = RedisTLS(str(pki / "ca.pem")), ""
    env = {k: v for k, v in cli_env(tmp_path, tls_url, tls).items() if v is not None}
    done = invoke(env, "calls", "list")
    assert done.exit_code == 1 and "Traceback" not in done.output
    [line] = done.stderr.splitlines()
    assert re.match(f"callguard: Redis unavailable: .*({expected})", line), line
    down = (redis.ConnectionError, redis.exceptions.RedisClusterException)
    with pytest.raises(down, match=expected or None):
        connect(tls_url, tls).ping()
    with pytest.raises(down, match=expected or None):
        asyncio.run(_ping_async(tls_url, tls))


def test_tls_files_are_checked_and_named(pki, tmp_path):
    url = "rediss://127.0.0.1:6380/0"  # nothing is reached: the files are refused first
    missing = str(tmp_path / "missing.pem")
    for tls, line in (
            (RedisTLS(missing), f"CALLGUARD_REDIS_TLS_CA ({missing}): cannot use it: No such "
                                "file or directory"),
            (RedisTLS(str(pki / "client.key")), f"CALLGUARD_REDIS_TLS_CA ({pki}/client.key):"
                                                " cannot use it: no certificate or crl found"),
            (RedisTLS(None, str(pki / "client.pem"), str(pki / "server.key")),
             f"CALLGUARD_REDIS_TLS_CERT and _KEY ({pki}/client.pem, {pki}/server.key): "
             "cannot use it: key values mismatch")):
        with pytest.raises(ConfigError) as refused:
            connect(url, tls)
        assert str(refused.value) == line
        with pytest.raises(ConfigError):
            PipelinedRedis(url, tls)
    done = invoke({"CALLGUARD_HOME": str(tmp_path / "home"), "CALLGUARD_REDIS_URL": url,
                   "CALLGUARD_REDIS_TLS_CA": missing}, "calls", "list")
    assert (done.exit_code, done.stderr) == (1, f"callguard: CALLGUARD_REDIS_TLS_CA "
                                                f"({missing}): cannot use it: No such file or "
                                                "directory\n")


def test_tls_settings_without_a_rediss_url_are_refused():
    with pytest.raises(ConfigError, match="CALLGUARD_REDIS_TLS_CA is set but the Redis URL is "
                                          "not rediss://"):
        load_settings(env={"CALLGUARD_REDIS_URL": "redis://127.0.0.1:6379/0",
                           "CALLGUARD_REDIS_TLS_CA": "/etc/ssl/ca.pem"})
    with pytest.raises(ConfigError, match="CALLGUARD_REDIS_TLS_CERT and CALLGUARD_REDIS_TLS_KEY "
                                          "go together"):
        load_settings(env={"CALLGUARD_REDIS_URL": "rediss://r:6380/0",
                           "CALLGUARD_REDIS_TLS_CERT": "/etc/callguard/client.pem"})


@pytest.mark.parametrize("query", ["ssl_cert_reqs=none", "ssl_check_hostname=false",
                                   "ssl_ca_certs=/tmp/their-ca.pem"])
def test_a_rediss_url_cannot_turn_verification_off(query):
    """redis-py would take these from the URL over callguard's own arguments."""
    with pytest.raises(ConfigError, match="CALLGUARD_REDIS_URL has TLS options in its query"):
        load_settings(env={"CALLGUARD_REDIS_URL": f"rediss://:pw@r:6380/0?{query}"})
