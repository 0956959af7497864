"""Publisher and subscribers on different hosts joined by a bridge."""

import json


def test_publisher_reaches_subscribers_on_two_other_hosts(network):
    a, b, c = (network.add_host(n) for n in "abc")
    sub_b = b.sub_ready("orders.>", "-C", "2")
    sub_c = c.sub_ready("orders.*", "-C", "2")
    result = a.run("eda-pub", "orders.created", "one", "two")
    assert result.returncode == 0, result.stderr
    assert sub_b.wait() == 0 and sub_c.wait() == 0
    for sub in (sub_b, sub_c):
        events = [json.loads(line) for line in sub.lines()]
        assert [e["data"] for e in events] == ["one", "two"]
        assert events[0]["source"].endswith(events[0]["id"].rsplit("-", 1)[0])


def test_subscriber_on_another_host_finds_a_running_feed(network, tmp_path):
    import os

    a, b = network.add_host("a"), network.add_host("b")
    reader, writer = os.pipe()
    try:
        pub = a.eda("eda-pub", "-v", "feed.x", stdin=reader)
        pub.wait_stderr("announced", 30)  # deadlines for a loaded machine: each is a condition
        sub = b.eda("eda-sub", "-v", "feed.>", "-C", "1")
        sub.wait_stderr(r"connected to publisher \w+ at tcp://10\.231\.", 30)
        subid = sub.wait_stderr(r"as (\w+)").group(1)
        pub.wait_stderr(f"subscriber {subid} ready", 30)
        os.write(writer, b"across hosts\n")
        assert sub.wait() == 0
        assert json.loads(sub.lines()[0])["data"] == "across hosts"
    finally:
        os.close(writer)
        os.close(reader)
    assert pub.wait() == 0


def test_dead_and_cut_off_hosts_do_not_stall_publishers(network):
    a, b, c, d = (network.add_host(n) for n in "abcd")
    alive = b.sub_ready("t", "-C", "1")
    killed = c.sub_ready("t")
    cut = d.sub_ready("t")
    c.kill()
    d.cut()
    result = a.run("eda-pub", "t", "still delivered", "--wait", "5")
    assert result.returncode == 0
    # nobody dead was waited for (eda-pub says so when --wait runs out on one)
    assert "not ready after" not in result.stderr, result.stderr
    assert alive.wait() == 0
    assert json.loads(alive.lines()[0])["data"] == "still delivered"
    assert killed.popen.wait(5) == -9
    assert cut.lines() == []


def test_subscriber_reports_a_publisher_that_connected_to_it_first():
    """Both sides browse, so a publisher often connects to a new subscriber before
    the subscriber's own discovery of it: eda-sub -v still says it is connected
    (it used to say nothing, whichever way events then flowed)."""
    from eda.core import discovery, pubsub
    from tests.helpers import wait_until

    reported: list[discovery.Peer] = []
    sub = pubsub.Subscriber(["feed.>"], on_connect=reported.append)
    pub = pubsub.Publisher()
    try:
        pub.bind("127.0.0.1:0")
        pub.connect(sub.bind("127.0.0.1:0"))  # the publisher dials first

        def welcomed() -> bool:
            pub.service()  # (its socket sends the welcome when used)
            if sub.poll(0.05):
                sub.receive()
            return pub.id in sub.publishers

        wait_until(welcomed, 15, "the publisher's welcome")
        found = discovery.Peer(pub.id, pub.endpoints[0], ("feed.x",), f"eda-pub-h-{pub.id}")
        sub._peers.put(found)  # the subscriber's discovery finds it now
        sub.connect_discovered()
        assert reported == [found]
        assert found.endpoint not in sub._connected  # linked already: not dialed again
        sub._peers.put(found)  # announced again (an update): reported once
        sub.connect_discovered()
        assert reported == [found]
    finally:
        pub.close()
        sub.close()
