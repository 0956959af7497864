"""The long-lived link policy (:class:`eda.core.sockets.Liveness`) and the
``EDA_LIVENESS_SCALE`` environment variable that shortens it for tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from eda.core import sockets
from eda.core.errors import ConfigError
from eda.core.sockets import LONG_LIVED, SCALE_ENV, liveness_scale, new_socket
from tests import helpers
from tests.helpers import run

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")


def test_the_policy_figures_bound_the_drop_and_the_reconnect() -> None:
    assert LONG_LIVED.dropped_within == 4.0
    assert LONG_LIVED.reconnected_within == 2.0
    quarter = LONG_LIVED.scaled(0.25)
    assert (quarter.heartbeat, quarter.timeout, quarter.ttl) == (0.25, 0.75, 0.75)
    assert (quarter.dropped_within, quarter.reconnected_within) == (1.0, 0.5)
    assert LONG_LIVED.scaled(1.0) is LONG_LIVED


def test_a_long_lived_socket_gets_the_figures_scaled_by_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SCALE_ENV, "0.5")
    live = new_socket(zmq.DEALER, liveness=LONG_LIVED)
    plain = new_socket(zmq.DEALER)
    try:
        assert live.getsockopt(zmq.HEARTBEAT_IVL) == 500
        assert live.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 1500
        assert live.getsockopt(zmq.HEARTBEAT_TTL) == 1500
        assert live.getsockopt(zmq.CONNECT_TIMEOUT) == 500
        assert live.getsockopt(zmq.RECONNECT_IVL) == 50
        assert live.getsockopt(zmq.RECONNECT_IVL_MAX) == 500
        assert plain.getsockopt(zmq.HEARTBEAT_IVL) == 0  # one-shot sockets: no heartbeats
    finally:
        live.close()
        plain.close()
    monkeypatch.delenv(SCALE_ENV)
    assert liveness_scale() == 1.0


@pytest.mark.parametrize("text", ["abc", "0", "-1", "nan", "inf", "100"])
def test_a_bad_scale_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(SCALE_ENV, text)
    with pytest.raises(ConfigError, match=SCALE_ENV):
        sockets.new_socket(zmq.DEALER, liveness=LONG_LIVED)


def test_a_2pc_daemon_given_a_bad_scale_says_so_at_start(tmp_path: Path) -> None:
    """Its links are made when first needed: the value is checked before serving anyway."""
    result = run("eda-txn", "coordinator", "--no-mdns", "--serverless", "--log",
                 str(tmp_path / "log"), "--bind", "tcp://127.0.0.1:0", env={SCALE_ENV: "0"})  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"eda-txn: error: {SCALE_ENV}='0': not a number from 0.05 to 10\n"
