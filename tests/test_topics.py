import pytest
from hypothesis import given
from hypothesis import strategies as st

from eda.core.errors import UsageError
from eda.core.topics import Matcher, subscription_prefix, validate_pattern, validate_topic

token = st.text(alphabet="abcdefgh0123-_", min_size=1, max_size=6)
topics = st.lists(token, min_size=1, max_size=5).map(".".join)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("orders.*", "orders.created", True),
        ("orders.*", "orders.created.eu", False),
        ("orders.*", "orders", False),
        ("orders.>", "orders.created", True),
        ("orders.>", "orders.created.eu", True),
        ("orders.>", "orders", False),
        ("*.created", "orders.created", True),
        ("*.created", "orders.deleted", False),
        ("orders.created", "orders.created", True),
        ("orders.created", "orders.createdx", False),
        (">", "anything.at.all", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
    ],
)
def test_pattern_semantics(pattern, topic, matches):
    assert Matcher([pattern])(topic) is matches


def test_several_patterns_match_any():
    m = Matcher(["orders.*", "logs.>"])
    assert m("orders.x") and m("logs.a.b") and not m("metrics.cpu")


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", "a b", "a.*x", "a.b>", "x\x00y"])
def test_invalid_patterns_are_refused(bad):
    with pytest.raises(UsageError):
        validate_pattern(bad)


@pytest.mark.parametrize("bad", ["", "a.*", "a.>", "a b", ".a", "a."])
def test_invalid_topics_are_refused(bad):
    with pytest.raises(UsageError):
        validate_topic(bad)


def test_subscription_prefix_is_the_literal_part():
    assert subscription_prefix("orders.*.eu") == "orders."
    assert subscription_prefix("orders.>") == "orders."
    assert subscription_prefix("*.x") == ""
    assert subscription_prefix("a.b") == "a.b"


@given(topics)
def test_a_topic_matches_itself_and_its_wildcards(topic):
    tokens = topic.split(".")
    assert Matcher([topic])(topic)
    assert Matcher([">"])(topic)
    assert Matcher([".".join(["*"] * len(tokens))])(topic)
    if len(tokens) > 1:
        assert Matcher([tokens[0] + ".>"])(topic)


@given(topics, topics)
def test_zmq_prefix_never_filters_out_a_match(pattern_topic, topic):
    # whatever the exact matcher accepts, the byte prefix must let through
    for pattern in (pattern_topic, pattern_topic.split(".")[0] + ".>"):
        if Matcher([pattern])(topic):
            assert topic.startswith(subscription_prefix(pattern))


@pytest.mark.parametrize(
    ("mqtt", "eda"),
    [
        ("orders.#", "orders.>"),
        ("orders/#", "orders.>"),
        ("orders/+", "orders.*"),
        ("+/x/#", "*.x.>"),
    ],
)
def test_mqtt_style_patterns_are_refused_with_the_eda_spelling(mqtt, eda):
    with pytest.raises(UsageError) as info:
        validate_pattern(mqtt)
    assert f"use {eda!r}" in str(info.value)


@pytest.mark.parametrize("check", [validate_topic, validate_pattern])
def test_arguments_that_were_not_utf8_are_refused(check):
    undecodable = b"orders.\xff".decode("utf-8", "surrogateescape")  # as Python hands argv over
    with pytest.raises(UsageError) as info:
        check(undecodable)
    assert "not valid UTF-8" in str(info.value) and "\\xff" in str(info.value)


@pytest.mark.parametrize("bad", ["a\x1b[2J", "a\nb", "x" * 256, "é" * 128])
def test_control_characters_and_overlong_topics_are_refused(bad):
    with pytest.raises(UsageError):
        validate_topic(bad)
    validate_topic("é" * 127)  # 254 bytes: fits
