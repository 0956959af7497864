"""Secure mode's keys on disk: this identity's CURVE key pair and the trusted peers' keys.

Layout (``eda-keys`` writes it; ``--key FILE`` and ``--trust DIR`` replace
the defaults)::

    $XDG_CONFIG_HOME/eda/keys/id.key          this identity's key pair (0600, ZPL as
                                              zmq.auth writes certificates)
    $XDG_CONFIG_HOME/eda/keys/trusted/NAME.pub  one trusted peer: its public key (Z85)

Keys are Z85 text, 40 characters (32 bytes).  A key file readable by group
or others, a missing key file and a malformed trusted key are refused with
one line naming the file.  :class:`Trusted` re-reads its directory when it
changes, so ``eda-keys revoke`` reaches running daemons for new connections.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError, EdaError, UsageError

if TYPE_CHECKING:  # pathlib (with urllib.parse, fnmatch) only when a key file is used: a
    from pathlib import Path  # one-shot command not in secure mode never needs it

KEY_LENGTH = 40  # Z85 text of a 32-byte Curve25519 key
# Z85's alphabet (ZeroMQ RFC 32): 85 printable characters, no quote, no backslash
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a trusted peer's name (a file name)
ID_FILE = "id.key"
TRUSTED_DIR = "trusted"
SUFFIX = ".pub"


def is_key(text: str) -> bool:
    """Whether *text* is a Z85 public key (40 characters of the Z85 alphabet)."""
    return bool(_Z85.fullmatch(text))


def keys_dir() -> Path:
    """``$XDG_CONFIG_HOME/eda/keys`` (``~/.config`` when the variable is unset)."""
    from pathlib import Path

    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "eda" / "keys"


def default_key_file() -> Path:
    return keys_dir() / ID_FILE


def default_trust_dir() -> Path:
    return keys_dir() / TRUSTED_DIR


@dataclass(frozen=True)
class Identity:
    """A CURVE key pair, both halves as Z85 bytes (what pyzmq's socket options take)."""

    public: bytes
    secret: bytes
    path: Path

    @property
    def public_text(self) -> str:
        return self.public.decode()


def _zpl_value(text: str, name: str) -> str | None:
    """The quoted value of *name* in a ZPL certificate (``name = "value"``)."""
    match = re.search(rf'^\s*{name}\s*=\s*"([^"]*)"', text, re.MULTILINE)
    return match.group(1) if match else None


def create_identity(path: Path) -> Identity:
    """Make a new key pair in *path* (0600, created so, never readable by others).

    Refuses to replace an existing file (a new identity is a new key for every
    peer that trusts this one): :class:`UsageError`.
    """
    import zmq

    public, secret = zmq.curve_keypair()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = (
        "#   eda identity (CURVE key pair): keep it secret\n"
        "metadata\n"
        "curve\n"
        f'    public-key = "{public.decode()}"\n'
        f'    secret-key = "{secret.decode()}"\n'
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(
            f"{path} exists: this identity already has a key (eda-keys show prints it)"
        ) from None
    except OSError as exc:
        raise EdaError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return Identity(public, secret, path)


def load_identity(path: Path) -> Identity:
    """This identity's key pair from *path*; one-line :class:`ConfigError` naming the
    file when it is missing, readable by others or malformed."""
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"no key file {path}: run eda-keys init (or give --key FILE)") from None
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}):"
            f" chmod 600 {path}"
        )
    public, secret = _zpl_value(text, "public-key"), _zpl_value(text, "secret-key")
    if public is None or secret is None or not is_key(public) or not is_key(secret):
        raise ConfigError(f"key file {path} is malformed: it needs a public-key and a secret-key")
    return Identity(public.encode(), secret.encode(), path)


def read_public_key(path: Path) -> bytes:
    """The Z85 key a trusted file holds (its first line); ConfigError naming it if malformed."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read trusted key {path}: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or not is_key(lines[0]):
        raise ConfigError(
            f"trusted key {path} is malformed: it must hold one Z85 public key "
            f"({KEY_LENGTH} characters)"
        )
    return lines[0].encode()


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(
            f"bad name {name[:80]!r}: letters, digits, '_', '.', '-' (at most 64, not"
            " starting with a punctuation mark)"
        )
    return name


def check_key(key: str) -> bytes:
    if not is_key(key):
        raise UsageError(
            f"bad key {key[:80]!r}: a public key is {KEY_LENGTH} Z85 characters (eda-keys show)"
        )
    return key.encode()


def trust(directory: Path, name: str, key: str) -> Path:
    """Trust *key* under *name* (written whole, then renamed: a reader never sees half)."""
    check_name(name)
    value = check_key(key)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{name}{SUFFIX}"
    tmp = directory / f".{name}{SUFFIX}.tmp"
    tmp.write_bytes(value + b"\n")
    os.replace(tmp, path)
    return path


def revoke(directory: Path, name: str) -> Path:
    """Stop trusting *name*; :class:`~eda.core.errors.NotFoundError` when it is not trusted."""
    from .errors import NotFoundError

    check_name(name)
    path = directory / f"{name}{SUFFIX}"
    try:
        path.unlink()
    except FileNotFoundError:
        raise NotFoundError(f"{name!r} is not trusted (no {path})") from None
    return path


def trusted_files(directory: Path) -> list[Path]:
    """The NAME.pub files of *directory*, by name (none when it does not exist)."""
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read trusted directory {directory}: {exc.strerror}") from None
    return [
        p for p in entries if p.name.endswith(SUFFIX) and NAME.fullmatch(p.name[: -len(SUFFIX)])
    ]


class Trusted:
    """The trusted public keys of a directory, re-read when the directory changes.

    :meth:`load` reads it strictly (a malformed file is a :class:`ConfigError`:
    a program refuses to start on it).  While running, :meth:`name_of` re-reads
    it when its listing or a file's modification time changed; a file that
    became malformed is then skipped and listed in :attr:`problems`, and
    the others keep being trusted (a daemon survives a bad edit).  Thread-safe:
    the ZAP handler asks from its own thread.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int], ...] | None = None
        self._by_key: dict[bytes, str] = {}
        self.problems: list[str] = []  # problems found by the last re-read

    def _scan(self) -> tuple[tuple[str, int], ...]:
        sig = []
        for path in trusted_files(self.directory):
            with contextlib.suppress(OSError):
                sig.append((path.name, path.stat().st_mtime_ns))
        return tuple(sig)

    def load(self) -> Trusted:
        """Read the directory now; :class:`ConfigError` on the first malformed file."""
        with self._lock:
            signature = self._scan()
            self._by_key = {
                read_public_key(self.directory / name): name[: -len(SUFFIX)]
                for name, _ in signature
            }
            self._signature = signature
        return self

    def refresh(self) -> None:
        """Re-read the directory if it changed; malformed files skipped (see :attr:`problems`)."""
        with self._lock:
            try:
                signature = self._scan()
            except ConfigError as exc:
                self.problems = [str(exc)]
                return
            if signature == self._signature:
                return
            by_key: dict[bytes, str] = {}
            problems = []
            for name, _ in signature:
                try:
                    by_key[read_public_key(self.directory / name)] = name[: -len(SUFFIX)]
                except ConfigError as exc:
                    problems.append(str(exc))
            self._by_key, self._signature, self.problems = by_key, signature, problems

    def name_of(self, key: bytes) -> str | None:
        """The name *key* is trusted under (Z85 bytes), or None; re-reads on change."""
        self.refresh()
        return self._by_key.get(key)

    def items(self) -> list[tuple[str, bytes]]:
        """(name, key) of every trusted key, by name."""
        self.refresh()
        return sorted((name, key) for key, name in self._by_key.items())
