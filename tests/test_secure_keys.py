"""eda-keys and the key files of secure mode (core/keys.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eda.core import keys
from eda.core.errors import ConfigError


def eda_keys(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eda.cli.keys", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    return {"XDG_CONFIG_HOME": str(tmp_path / "config")}


def test_init_writes_a_private_key_pair_and_show_prints_the_public_key(home, tmp_path):
    made = eda_keys("init", env=home)
    assert made.returncode == 0 and made.stderr == ""
    public = made.stdout.strip()
    assert keys.is_key(public)
    path = tmp_path / "config" / "eda" / "keys" / "id.key"
    assert path.stat().st_mode & 0o777 == 0o600
    shown = eda_keys("show", env=home)
    assert (shown.returncode, shown.stdout.strip()) == (0, public)
    # the file is a ZPL certificate as zmq.auth writes them
    import zmq.auth

    assert zmq.auth.load_certificate(str(path)) == (
        public.encode(),
        keys.load_identity(path).secret,
    )


def test_init_never_replaces_an_identity(home):
    first = eda_keys("init", env=home).stdout
    again = eda_keys("init", env=home)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith("eda-keys: error: ") and "exists" in again.stderr
    assert eda_keys("show", env=home).stdout == first


def test_trust_list_revoke(home, tmp_path):
    key = eda_keys("init", env=home).stdout.strip()
    assert eda_keys("trust", "alice", key, env=home).returncode == 0
    trusted = tmp_path / "config" / "eda" / "keys" / "trusted" / "alice.pub"
    assert trusted.read_text().strip() == key
    listed = eda_keys("list", "--json", env=home)
    assert listed.returncode == 0
    assert listed.stdout == f'{{"name":"alice","key":"{key}"}}\n'
    assert eda_keys("list", "--format", "{name}={key}", env=home).stdout == f"alice={key}\n"
    assert eda_keys("revoke", "alice", env=home).returncode == 0
    assert not trusted.exists()
    gone = eda_keys("revoke", "alice", env=home)
    assert gone.returncode == 3 and "'alice' is not trusted" in gone.stderr


def test_bad_names_and_keys_are_usage_errors(home):
    short = eda_keys("trust", "alice", "tooshort", env=home)
    assert short.returncode == 2 and short.stderr.count("\n") == 1 and "40 Z85" in short.stderr
    bad = eda_keys("trust", "../evil", "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", env=home)
    assert bad.returncode == 2 and "bad name" in bad.stderr


def test_key_problems_are_one_line_naming_the_file(home, tmp_path):
    missing = eda_keys("show", env=home)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "id.key" in missing.stderr and "eda-keys init" in missing.stderr
    eda_keys("init", env=home)
    path = tmp_path / "config" / "eda" / "keys" / "id.key"
    path.chmod(0o644)
    loose = eda_keys("show", env=home)
    assert loose.returncode == 2 and loose.stdout == "" and loose.stderr.count("\n") == 1
    assert f"key file {path} is readable by others" in loose.stderr


def test_a_malformed_trusted_key_is_named_and_the_others_kept(home, tmp_path):
    key = eda_keys("init", env=home).stdout.strip()
    eda_keys("trust", "alice", key, env=home)
    directory = tmp_path / "config" / "eda" / "keys" / "trusted"
    (directory / "broken.pub").write_text("not a key\n")
    listed = eda_keys("list", "--json", env=home)
    assert listed.returncode == 1
    assert f"trusted key {directory / 'broken.pub'} is malformed" in listed.stderr
    assert '"alice"' in listed.stdout
    with pytest.raises(ConfigError, match=r"broken\.pub is malformed"):
        keys.Trusted(directory).load()


def test_trusted_directory_is_reread_when_it_changes(tmp_path):
    directory = tmp_path / "trusted"
    a = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    keys.trust(directory, "alice", a)
    trusted = keys.Trusted(directory).load()
    assert trusted.name_of(a.encode()) == "alice"
    keys.revoke(directory, "alice")
    assert trusted.name_of(a.encode()) is None
    keys.trust(directory, "alice2", a)
    (directory / "junk.pub").write_text("junk")
    assert trusted.name_of(a.encode()) == "alice2"  # a bad file does not lose good keys
    assert trusted.problems and "junk.pub" in trusted.problems[0]


def test_allow_list_admits_only_the_named_trusted_keys(tmp_path):
    from eda.core.errors import UsageError
    from eda.core.security import Security

    alice = keys.create_identity(tmp_path / "alice.key")
    bob = keys.create_identity(tmp_path / "bob.key")
    me = keys.create_identity(tmp_path / "me.key")
    trusted_dir = tmp_path / "trusted"
    keys.trust(trusted_dir, "alice", alice.public_text)
    keys.trust(trusted_dir, "bob", bob.public_text)
    security = Security(me, keys.Trusted(trusted_dir).load())
    admission = security._admission
    assert admission is not None
    # default: every trusted key
    assert admission.callback("eda", alice.public) and admission.callback("eda", bob.public)
    assert not admission.callback("eda", me.public)
    security.allow([])
    assert admission.callback("eda", bob.public)
    with pytest.raises(UsageError, match="'carol': not a trusted name"):
        security.allow(["carol"])
    assert admission.callback("eda", bob.public)  # a refused --allow changed nothing
    security.allow(["alice"])
    assert admission.callback("eda", alice.public)
    assert not admission.callback("eda", bob.public)
    assert bob.public.decode() in security.denied
    keys.revoke(trusted_dir, "alice")
    assert not admission.callback("eda", alice.public)  # revocation still wins


def test_peer_name_is_the_key_the_handshake_proved():
    from eda.core import security

    class Frame:
        def __init__(self, user: object) -> None:
            self.user = user

        def get(self, name: str) -> object:
            assert name == "User-Id"
            if self.user is None:
                raise security.zmq.ZMQError(22)
            return self.user

    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    assert security.peer_key(Frame(key)) == key
    assert security.peer_key(Frame(key.encode())) == key
    assert security.peer_key(Frame(None)) == ""  # a plain socket has no User-Id
    assert security.peer_key(Frame("not a key")) == ""


@pytest.mark.parametrize("first", ["-", "-h", "--", "-v"])
def test_a_key_beginning_with_a_dash_is_trusted_as_given(home, tmp_path, first):
    """Z85 has '-': about one key in 85 begins with it, and ``eda-keys trust NAME KEY``
    as the README shows it must take it as the key, never as an option (-h, --)."""
    key = first + "rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7Abc"[: 40 - len(first)]
    done = eda_keys("trust", "alice", key, env=home)
    assert (done.returncode, done.stderr) == (0, "")
    trusted = tmp_path / "config" / "eda" / "keys" / "trusted" / "alice.pub"
    assert trusted.read_text().strip() == key
    assert eda_keys("trust", "bob", "--", key, env=home).returncode == 0
