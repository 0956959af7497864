"""The NATS engine speaks NATS's own security: TLS with a CA and client certificates,
nkeys, JWT credentials, user and password, tokens.

Real ``nats-server`` processes configured by each test (inside the suite's
private network namespace), certificates made with ``openssl`` here (a CA, a
server certificate for 127.0.0.1, a client certificate, and a CA nobody
trusts), nkeys made with the ``nkeys`` package; an eda-bus front in front of
each server publishes and reads back events, and what must be refused is
refused at once with one line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from eda.core.bus.nats.connect import NatsAuth, prepare, redact
from eda.core.errors import ConfigError, UsageError
from tests.bus_engines import free_port
from tests.helpers import Proc, Procs, require_tools, run
from tests.natsnodes import nats_server
from tests.test_bus import replay

PASSWORD = "pw-Zq7!xK2vMark"  # distinctive: searched for in every output
TOKEN = "tok-Jh4RnW9sEcret"


# -- certificates and keys ------------------------------------------------------------
class Pki(NamedTuple):
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA that signed nothing of this server


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def _ca(work: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=eda test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=work)  # fmt: skip


def _signed(work: Path, name: str, ca: str, usage: str) -> None:
    (work / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n"
        f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=work)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=work)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tools("openssl", install="openssl")
    work = tmp_path_factory.mktemp("pki")
    _ca(work, "ca")
    _ca(work, "rogue")
    _signed(work, "server", "ca", "serverAuth")
    _signed(work, "client", "ca", "clientAuth")
    return Pki(work / "ca.pem", work / "server.pem", work / "server.key",
               work / "client.pem", work / "client.key", work / "rogue.pem")  # fmt: skip


def _nkeys() -> Any:
    import nkeys

    return nkeys


def new_seed(prefix: int) -> bytes:
    """A new nkey seed (``SU...`` for a user, ``SA...`` an account, ``SO...`` an operator)."""
    return bytes(_nkeys().encode_seed(os.urandom(32), prefix))


def public_key(seed: bytes) -> str:
    return str(_nkeys().from_seed(bytearray(seed)).public_key.decode())


# -- servers and fronts -------------------------------------------------------------------
class Server:
    """A nats-server -js configured by the test (its ``conf``), on 127.0.0.1."""

    def __init__(self, procs: Procs, work: Path, conf: str, scheme: str = "nats") -> None:
        nats_server()
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        path = work / "nats.conf"
        path.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{work / "js"}" }}\n{conf}\n'
        )
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.proc: Proc = procs.start([nats_server(), "-c", str(path)])
        self.proc.wait_stderr("Server is ready", 20)

    def refusals(self) -> int:
        """Connections the server refused so far (authentication or TLS)."""
        log = self.proc.stderr
        return len(re.findall(r"(?i)authoriz\w* (?:error|violation)|authentication error"
                              r"|TLS handshake error", log))  # fmt: skip


def start_front(procs: Procs, url: str, *args: str, env: dict[str, str] | None = None) -> str:
    """An eda-bus front on *url* (the default stream: fronts of one server share it);
    its endpoint once it serves."""
    bus = procs.eda("eda-bus", "serve", "--engine", url, "--bind", "tcp://127.0.0.1:0",
                    "--no-mdns", *args, env=env)  # fmt: skip
    m = bus.wait_stderr(r"serving NATS stream \S+ at (\S+) on (tcp://\S+)", 30)
    assert PASSWORD not in m[1] and TOKEN not in m[1], m[1]
    return m[2]


def round_trip(ep: str, topic: str) -> None:
    """Events published through the front are read back through it."""
    done = run("eda-pub", "--bus", ep, "--confirm", topic, input="one\ntwo\n")
    assert done.returncode == 0, done.stderr
    assert replay(ep, topic, 2, "--raw") == ["one", "two"]


def refused(server: Server, *args: str, env: dict[str, str] | None = None,
            status: int = 1, attempts: int = 1) -> str:  # fmt: skip
    """Run ``eda-bus serve`` on *server* expecting it to stop at once (after at most
    *attempts* connections, never a retry loop until the timeout): its one line."""
    before = server.refusals()
    done = run("eda-bus", "serve", "--engine", *args, "--bind", "tcp://127.0.0.1:0",
               "--no-mdns", env=env, timeout=60)  # fmt: skip
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eda-bus: error: "), done.stderr
    assert done.stdout == ""
    assert server.refusals() - before <= attempts, server.proc.stderr
    return lines[0].removeprefix("eda-bus: error: ")


def no_secret_in(procs: Procs) -> None:
    """Neither the password nor the token appears in anything a process printed."""
    for proc in procs.started:
        out = proc.stdout + proc.stderr
        if proc.popen.args[0] == nats_server():
            continue  # the server's own log is not eda's output
        assert PASSWORD not in out and TOKEN not in out, out


# -- what is checked before connecting --------------------------------------------------
def test_credentials_in_urls_are_taken_out_and_hidden_wherever_shown() -> None:
    urls = "nats://alice:pw@h:1,tls://tok@h:2,nats://h:3"
    assert redact(urls) == "nats://alice:***@h:1,tls://***@h:2,nats://h:3"
    plan = prepare([f"nats://alice:{PASSWORD.replace('!', '%21')}@h:1", "nats://alice:"
                    f"{PASSWORD.replace('!', '%21')}@h:2"])  # fmt: skip
    assert plan.servers == ["nats://h:1", "nats://h:2"] and plan.shown == "nats://h:1,nats://h:2"
    assert (plan.auth.user, plan.auth.password) == ("alice", PASSWORD)  # unquoted
    assert plan.scrub(f"nats: {PASSWORD} refused") == "nats: *** refused"
    token = prepare([f"tls://{TOKEN}@h:1"])
    assert token.auth.token == TOKEN and token.tls and token.servers == ["tls://h:1"]
    assert PASSWORD not in repr(NatsAuth(user="alice", password=PASSWORD, token=TOKEN))
    assert TOKEN not in repr(NatsAuth(token=TOKEN))


def test_two_ways_to_authenticate_or_half_of_one_are_usage_errors(tmp_path: Path) -> None:
    for servers, auth, what in [
        (["nats://a:b@h:1", "nats://c:d@h:2"], NatsAuth(), "different credentials"),
        (["nats://a:b@h:1"], NatsAuth(token="t"), "both in a server URL and given apart"),
        (["nats://h:1"], NatsAuth(user="alice"), "needs its password"),
        (["nats://h:1"], NatsAuth(password="p"), "needs its password"),
        (["nats://h:1"], NatsAuth(token="t", user="a", password="p"), "more than one way"),
        (["nats://h:1"], NatsAuth(creds=tmp_path / "x", nkey=tmp_path / "y"), "more than one way"),
        (["nats://h:1"], NatsAuth(tls_key=tmp_path / "k"), "needs its certificate"),
    ]:
        with pytest.raises(UsageError, match=what):
            prepare(servers, auth)


def test_missing_and_malformed_files_are_config_errors_naming_them(
    tmp_path: Path, pki: Pki
) -> None:
    missing = tmp_path / "missing"
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    for auth, what in [
        (NatsAuth(creds=missing), f"NATS credentials file {missing}: No such file"),
        (NatsAuth(creds=junk), f"NATS credentials file {junk}: no BEGIN NATS USER JWT block"),
        (NatsAuth(nkey=missing), f"NATS nkey seed file {missing}: No such file"),
        (NatsAuth(nkey=junk), f"NATS nkey seed file {junk}: not an nkey seed"),
        (NatsAuth(tls_ca=missing), f"NATS TLS CA file {missing}: No such file"),
        (NatsAuth(tls_ca=junk), f"NATS TLS CA file {junk}: no PEM certificate"),
        (NatsAuth(tls_cert=missing), f"NATS TLS client certificate {missing}: No such file"),
        (NatsAuth(tls_cert=pki.client_cert, tls_key=missing),
         f"NATS TLS client key {missing}: No such file"),
        (NatsAuth(tls_cert=pki.client_cert, tls_key=pki.server_key),
         f"NATS TLS client certificate {pki.client_cert} and key {pki.server_key}: "),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            prepare(["nats://h:1"], auth)
        assert str(err.value).startswith(what), (str(err.value), what)
        assert "\n" not in str(err.value)
    seed = new_seed(_nkeys().PREFIX_BYTE_USER)
    jwt = "eyJh.eyJz.c2ln"
    creds = tmp_path / "user.creds"
    creds.write_text(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
                     f"-----BEGIN USER NKEY SEED-----\nSUjunk\n------END USER NKEY SEED------\n")  # fmt: skip
    with pytest.raises(ConfigError, match=f"NATS credentials file {creds}: not an nkey seed"):
        prepare(["nats://h:1"], NatsAuth(creds=creds))
    creds.write_text(creds.read_text().replace("SUjunk", seed.decode()))
    assert prepare(["nats://h:1"], NatsAuth(creds=creds)).credentials


# -- against real servers -----------------------------------------------------------------
def test_tls_verifying_client_certificates_with_an_nkey_user(
    procs: Procs, pki: Pki, tmp_path: Path
) -> None:
    nkeys = _nkeys()
    seed = tmp_path / "user.nk"
    seed.write_bytes(new_seed(nkeys.PREFIX_BYTE_USER) + b"\n")
    other = tmp_path / "other.nk"
    other.write_bytes(new_seed(nkeys.PREFIX_BYTE_USER) + b"\n")
    server = Server(procs, tmp_path / "nats", f"""
tls {{
  cert_file: "{pki.server_cert}"
  key_file: "{pki.server_key}"
  ca_file: "{pki.ca}"
  verify: true
}}
authorization {{ users: [ {{ nkey: "{public_key(seed.read_bytes().strip())}" }} ] }}
""", scheme="tls")  # fmt: skip
    cert = ("--nats-tls-cert", str(pki.client_cert), "--nats-tls-key", str(pki.client_key))
    tls = ("--nats-tls-ca", str(pki.ca), *cert)
    round_trip(start_front(procs, server.url, "--nats-nkey", str(seed), *tls), "orders.tls")
    # a nats:// URL with a CA given: TLS all the same
    plain_url = server.url.replace("tls://", "nats://")
    round_trip(start_front(procs, plain_url, "--nats-nkey", str(seed), *tls), "orders.again")
    # the refusals: one line each, exit 1, one attempt
    url = server.url
    assert refused(server, url, "--nats-nkey", str(other), *tls) == (
        f"NATS at {url} refused the credentials (Authorization Violation)"
    )
    assert refused(server, url, *tls) == (
        f"NATS at {url} wants credentials and none were given (Authorization Violation)"
    )
    untrusted = refused(server, url, "--nats-nkey", str(seed), "--nats-tls-ca",
                        str(pki.rogue_ca), *cert)  # fmt: skip
    assert untrusted == (
        f"TLS with NATS at {url} failed: the server's certificate is not trusted "
        "(unable to get local issuer certificate)"
    )
    system_cas = refused(server, url, "--nats-nkey", str(seed), *cert)
    assert system_cas.startswith(f"TLS with NATS at {url} failed: the server's certificate is not")
    # the server's refusal may come as a plain EOF (TLS 1.3: it refuses after the client's
    # Finished), then as its alert: nats-server 2.15 gave two EOFs in one run in four
    no_cert = refused(server, url, "--nats-nkey", str(seed), "--nats-tls-ca", str(pki.ca),
                      attempts=3)  # fmt: skip
    assert no_cert.startswith(f"TLS with NATS at {url} failed: the server refused it ("), no_cert
    assert no_cert.endswith("; it may want a client certificate)"), no_cert
    # a file missing: exit 2, naming it, before connecting
    gone = tmp_path / "gone.nk"
    assert refused(server, url, "--nats-nkey", str(gone), *tls, status=2) == (
        f"NATS nkey seed file {gone}: No such file or directory"
    )
    no_secret_in(procs)


def test_user_and_password_never_shown_from_options_url_or_config(
    procs: Procs, tmp_path: Path
) -> None:
    server = Server(procs, tmp_path / "nats",
                    f'authorization {{ user: alice, password: "{PASSWORD}" }}')  # fmt: skip
    env = {"EDA_BUS_NATS_PASSWORD": PASSWORD}
    round_trip(start_front(procs, server.url, "--nats-user", "alice", "-v", env=env), "a.env")
    in_url = f"nats://alice:{PASSWORD}@127.0.0.1:{server.port}"
    round_trip(start_front(procs, in_url, "-v"), "a.url")
    config = tmp_path / "eda.toml"
    config.write_text(f'[bus]\nnats_user = "alice"\nnats_password = "{PASSWORD}"\n')
    round_trip(start_front(procs, server.url, "-c", str(config)), "a.config")
    shown = [p.stderr for p in procs.started if "--nats-user" not in p.popen.args]
    assert any(f"at nats://alice:***@127.0.0.1:{server.port} on tcp://" in s for s in shown)
    # wrong or missing credentials: one line at once, the URL shown without them
    wrong = {"EDA_BUS_NATS_PASSWORD": "not-" + PASSWORD}
    url = server.url
    assert refused(server, url, "--nats-user", "alice", env=wrong) == (
        f"NATS at {url} refused the credentials (Authorization Violation)"
    )
    assert refused(server, in_url.replace("alice:", "bob:")) == (
        f"NATS at {url} refused the credentials (Authorization Violation)"
    )
    assert refused(server, url) == (
        f"NATS at {url} wants credentials and none were given (Authorization Violation)"
    )
    assert refused(server, url, "--nats-user", "alice", status=2) == (
        "a NATS user needs its password, and a password its user"
    )
    assert refused(server, in_url + ",nats://127.0.0.1:1/x", status=2) == (
        "bad NATS server 'nats://127.0.0.1:1/x': use nats://HOST:PORT[,nats://HOST:PORT...]"
    )
    bad = run("eda-bus", "serve", "--engine", in_url + "/x", "--no-mdns")
    assert bad.returncode == 2 and f"nats://alice:***@127.0.0.1:{server.port}/x" in bad.stderr
    debug = run("eda-bus", "-v", "serve", "--engine", url, "--nats-user", "alice", "--no-mdns",
                env=wrong, timeout=60)  # fmt: skip
    assert debug.returncode == 1 and "refused the credentials" in debug.stderr
    for done in (bad, debug):
        assert PASSWORD not in done.stdout + done.stderr
    # migrate takes the same options
    data = tmp_path / "bus"
    from eda.core.bus import SQLiteEngine
    from tests.test_bus_store import batch

    with SQLiteEngine(data / "bus.db") as store:
        store.append([batch(1, 3, "m.x")])
        store.commit()
    moved = run("eda-bus", "migrate", "--from", str(data), "--to", url,
                "--nats-user", "alice", env=env, timeout=60)  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["copied"] == 3
    moved = run("eda-bus", "migrate", "--from", str(data), "--to", url,
                "--nats-user", "alice", env=wrong, timeout=60)  # fmt: skip
    assert moved.returncode == 1 and moved.stderr == (
        f"eda-bus: error: NATS at {url} refused the credentials (Authorization Violation)\n"
    )
    no_secret_in(procs)


def test_a_token_over_tls_without_a_client_certificate(
    procs: Procs, pki: Pki, tmp_path: Path
) -> None:
    server = Server(procs, tmp_path / "nats", f"""
tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}" }}
authorization {{ token: "{TOKEN}" }}
""", scheme="tls")  # fmt: skip
    ca = ("--nats-tls-ca", str(pki.ca))
    env = {"EDA_BUS_NATS_TOKEN": TOKEN}
    round_trip(start_front(procs, server.url, *ca, env=env), "t.env")
    round_trip(start_front(procs, f"tls://{TOKEN}@127.0.0.1:{server.port}", *ca), "t.url")
    assert refused(server, server.url, *ca, env={"EDA_BUS_NATS_TOKEN": "x" + TOKEN}) == (
        f"NATS at {server.url} refused the credentials (Authorization Violation)"
    )
    assert refused(server, server.url, "--nats-tls-ca", str(pki.rogue_ca), env=env).startswith(
        f"TLS with NATS at {server.url} failed: the server's certificate is not trusted"
    )
    no_secret_in(procs)


def test_a_password_is_never_sent_in_clear_when_tls_was_asked_for() -> None:
    """A server (here a fake one) that does not offer TLS gets nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = bytearray()

    def serve() -> None:
        listener.settimeout(30)
        with listener, listener.accept()[0] as conn:
            conn.sendall(b'INFO {"server_id":"fake","version":"2.9.10","proto":1,'
                         b'"max_payload":1048576,"headers":true,"auth_required":true}\r\n')  # fmt: skip
            conn.settimeout(30)
            while chunk := conn.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    done = run("eda-bus", "serve", "--engine", f"tls://alice:{PASSWORD}@127.0.0.1:{port}",
               "--no-mdns", timeout=60)  # fmt: skip
    thread.join(30)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"eda-bus: error: NATS at tls://127.0.0.1:{port} does not offer TLS, which was asked "
        "for: no secret was sent\n"
    )
    assert PASSWORD.encode() not in received and b"alice" not in received


# -- JWT credentials: an operator-mode server, JWTs signed here with nkeys (no nsc) ------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_jwt(subject_seed: bytes, signer_seed: bytes, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2) about *subject_seed*'s public key, signed with *signer_seed*."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": public_key(signer_seed),
                              "name": name, "sub": public_key(subject_seed),
                              "nats": {**nats, "version": 2}}  # fmt: skip
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    key = _nkeys().from_seed(bytearray(signer_seed))
    return f"{head}.{body}.{_b64(key.sign(f'{head}.{body}'.encode()))}"


def creds_file(path: Path, jwt: str, seed: bytes) -> Path:
    """A credentials file as nsc writes it."""
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return path


class Operator(NamedTuple):
    conf: str  # the server's operator, resolver and preloaded accounts
    account: bytes  # the seed of the account users belong to


def operator_config() -> Operator:
    nkeys = _nkeys()
    operator = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
    account, system = (new_seed(nkeys.PREFIX_BYTE_ACCOUNT) for _ in range(2))
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                 "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    accounts = {
        public_key(account): signed_jwt(account, operator, "EDA", {
            "type": "account", "limits": {**unlimited, **jetstream}}),
        public_key(system): signed_jwt(system, operator, "SYS", {
            "type": "account", "limits": unlimited}),
    }  # fmt: skip
    preload = "\n".join(f'  {k}: "{v}"' for k, v in accounts.items())
    conf = (f'operator: "{signed_jwt(operator, operator, "eda-test", {"type": "operator"})}"\n'
            f'system_account: "{public_key(system)}"\n'
            f"resolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n")  # fmt: skip
    return Operator(conf, account)


def new_user(tmp_path: Path, name: str, account: bytes) -> Path:
    user = new_seed(_nkeys().PREFIX_BYTE_USER)
    jwt = signed_jwt(user, account, name, {"type": "user", "pub": {}, "sub": {},
                                           "subs": -1, "data": -1, "payload": -1})  # fmt: skip
    return creds_file(tmp_path / f"{name}.creds", jwt, user)


def test_jwt_credentials_against_an_operator_mode_server(procs: Procs, tmp_path: Path) -> None:
    op = operator_config()
    server = Server(procs, tmp_path / "nats", op.conf)
    creds = new_user(tmp_path, "eda", op.account)
    round_trip(start_front(procs, server.url, "--nats-creds", str(creds)), "jwt.ok")
    # a user of an account the server does not know: refused, one line, at once
    stranger = new_user(tmp_path, "stranger", new_seed(_nkeys().PREFIX_BYTE_ACCOUNT))
    assert refused(server, server.url, "--nats-creds", str(stranger)) == (
        f"NATS at {server.url} refused the credentials (Authorization Violation)"
    )
