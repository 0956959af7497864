"""Dot-separated topics and the patterns that match them.

``*`` matches exactly one token, ``>`` (last token only) matches one or more
trailing tokens.  ZeroMQ filters by byte prefix, so each pattern also yields
the literal prefix a SUB socket subscribes to; the exact match runs on top.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import UsageError

_TOKEN = re.compile(r"[^.\s*>\x00-\x1f\x7f]+")
MAX_TOPIC = 255  # bytes of UTF-8, so a topic fits a DNS-SD TXT string


def _encoded(text: str, what: str) -> bytes:
    """*text* as UTF-8; a command-line argument that was not UTF-8 is refused here."""
    try:
        raw = text.encode()
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise UsageError(f"{what} '{shown}' is not valid UTF-8") from None
    if len(raw) > MAX_TOPIC:
        raise UsageError(f"{what} is longer than {MAX_TOPIC} bytes")
    return raw


def validate_topic(topic: str) -> str:
    """Return *topic* if it is a concrete topic, else raise UsageError.

    One rule with patterns: a topic is a pattern without wildcards, so every
    topic can be subscribed to by its own name (MQTT-style ``orders/#`` is
    refused here too, with the same hint).
    """
    _encoded(topic, "topic")
    hint = _mqtt_hint(topic)
    if hint is not None:
        raise UsageError(
            f"invalid topic {topic!r} (MQTT style): eda separates tokens with '.', and a topic "
            f"has no wildcards (as a pattern: {hint!r})"
        )
    if not topic or any(not _TOKEN.fullmatch(tok) for tok in topic.split(".")):
        raise UsageError(
            f"invalid topic {topic!r}: use dot-separated tokens without spaces, '*' or '>'"
        )
    return topic


def _mqtt_hint(pattern: str) -> str | None:
    """The eda pattern for an MQTT-style one (``orders/#`` -> ``orders.>``), if it is one."""
    tokens = re.split(r"[./]", pattern)
    if not any(tok in ("#", "+") for tok in tokens):
        return None
    return ".".join(">" if tok == "#" else "*" if tok == "+" else tok for tok in tokens)


def validate_pattern(pattern: str) -> str:
    """Return *pattern* if well formed, else raise UsageError."""
    _encoded(pattern, "pattern")
    hint = _mqtt_hint(pattern)
    if hint is not None:
        raise UsageError(
            f"invalid pattern {pattern!r} (MQTT style): use {hint!r}; eda separates tokens "
            "with '.', '*' matches one token and a final '>' one or more"
        )
    tokens = pattern.split(".") if pattern else [""]
    for i, tok in enumerate(tokens):
        if tok == "*" or (tok == ">" and i == len(tokens) - 1) or _TOKEN.fullmatch(tok):
            continue
        raise UsageError(
            f"invalid pattern {pattern!r}: tokens are words, '*' (one token) "
            "or a final '>' (one or more tokens)"
        )
    return pattern


def subscription_prefix(pattern: str) -> str:
    """The literal prefix of *pattern*, usable as a ZeroMQ subscription."""
    tokens = pattern.split(".")
    literal: list[str] = []
    for tok in tokens:
        if tok in ("*", ">"):
            return "".join(t + "." for t in literal)
        literal.append(tok)
    return pattern


def covers(outer: str, pattern: str) -> bool:
    """Whether every topic *pattern* matches is matched by *outer* too (both well formed):
    ``orders.>`` covers ``orders.x``, ``orders.*.eu`` and ``orders.>``; ``orders.*``
    does not cover ``orders.>`` (``orders.a.b``), nor ``*`` a literal's place in *outer*."""
    outer_tokens, tokens = outer.split("."), pattern.split(".")
    for i, tok in enumerate(outer_tokens):
        if tok == ">":
            return i < len(tokens)  # one or more tokens left, whatever they match
        if i >= len(tokens) or tokens[i] == ">" or (tok != "*" and tok != tokens[i]):
            return False
    return len(tokens) == len(outer_tokens)


def _compile(pattern: str) -> re.Pattern[str]:
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(tok))
    return re.compile(r"\.".join(parts))


class Matcher:
    """Matches topics against several patterns, caching verdicts per topic."""

    __slots__ = ("_cache", "_regexes", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = [validate_pattern(p) for p in patterns]
        self._regexes = [_compile(p) for p in self.patterns]
        self._cache: dict[str, bool] = {}

    def __call__(self, topic: str) -> bool:
        verdict = self._cache.get(topic)
        if verdict is None:
            verdict = any(r.fullmatch(topic) for r in self._regexes)
            if len(self._cache) < 100_000:
                self._cache[topic] = verdict
        return verdict

    def prefixes(self) -> list[str]:
        """The distinct ZeroMQ subscription prefixes covering every pattern."""
        return sorted({subscription_prefix(p) for p in self.patterns})
