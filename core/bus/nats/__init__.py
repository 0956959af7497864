"""The NATS JetStream engine: eda-bus's log kept in a (replicated) JetStream stream.

Shape, and why:

* **One stream** (``EDA`` by default) over the subjects ``eda.<topic>``.  eda's
  topics are dot-separated tokens and its patterns use NATS's own wildcards
  (``*`` one token, ``>`` one or more trailing tokens), so a topic maps onto a
  subject 1:1 and a pattern onto a subject filter, without escaping.  Topics
  and names NATS would refuse are refused with a UsageError, never mangled.
* **One JetStream message carries one eda batch** (or the part of one that
  was new): JetStream costs about the same per message whatever its size, so
  a batch of hundreds of events costs one replicated write instead of
  hundreds.  A batch larger than the server's max payload (read from the
  connection; headers count) is cut into several messages; an event that
  does not fit in one by itself is refused (EventTooLargeError) before
  anything is stored.  The body is the wire batch's body (payloads joined by ``\\n``),
  so a plain NATS consumer of ``eda.>`` sees, per message, the subject
  ``eda.<topic>``, one event per line (a CloudEvents JSON object per line for
  envelopes) and the headers below; it must split lines itself.
* **Headers**: ``Eda-Seq`` (bus sequence of the first event), ``Eda-Count``
  (events in the message) and ``Eda-Meta`` (JSON: kind, publisher time,
  pubid, first publisher sequence, source, extensions, stored time).  Bus
  sequences are a running event count kept in the messages themselves: the
  message after one with ``Eda-Seq`` s and ``Eda-Count`` n starts at s + n.
  Every publish carries ``Nats-Expected-Last-Sequence``, so two writers can
  never assign the same bus sequences: the second one's publish is refused
  and this engine resynchronises from the stream (StoreError, nothing
  confirmed; the publisher resends).
* **Exactly-once storage**: ``Nats-Msg-Id`` = a digest of (pubid, topic,
  first publisher sequence) makes JetStream drop a resent message within its
  duplicate window (also one sent by another front, or before a crash); the
  engine also cuts each batch against the publisher sequences it has seen,
  as the embedded engine does, so a resend overlapping a stored batch only
  stores its new part, also after the duplicate window.
* **Durability**: ``append`` plans and queues; ``commit`` publishes what was
  appended, all at once (one hand-over to the asyncio loop per serving round,
  however many batches it holds), waits for the stream's acknowledgements
  (given by the Raft quorum when ``replicas`` > 1) and only then moves
  ``durable_seq``.  Sequences and publisher ranges an
  unacknowledged or refused publish took are forgotten again (the engine
  reads back what the stream holds), so a resend is stored, never taken for
  a duplicate.
* **Deadlines**: once open, no call waits for NATS longer than
  ``SERVE_DEADLINE`` (2 s), well inside a publisher's patience: a server
  that is slow, gone, or that lost acknowledgements with a restart costs a
  refused round (the publishers resend) or one error, never a stalled bus.
  A broken connection fails the acknowledgements awaited on it at once
  (nats-py reconnects to another server of the cluster).  While the stream
  has no leader (a publish answered 503: JetStream elects another 4 to 9 s
  after its leader died), calls only ask whether it has one again, waiting
  ``PROBE_DEADLINE`` (0.25 s) at most, so the bus notices the new leader
  within that time and confirms again.
* **Durable consumers** keep their exact position (a bus sequence, which may
  fall inside a message) in the key-value bucket ``<stream>_consumers``
  (itself a JetStream stream with the same replicas): a JetStream consumer
  acknowledges whole messages and is pulled by the server, whereas the bus
  reads by sequence and acknowledges per event.
* **Groups** are JetStream durable pull consumers (``eda_g_<group>``) with
  explicit acks: members claim by fetching, a message is acknowledged once a
  member acknowledged all its events, ``release`` naks what a dead member
  held (redelivered at once), what live members hold is reported in progress
  on every claim and ack of the group, and JetStream itself redelivers what
  a crashed engine held after ``ack_wait``.
* **Index**: the heads of the stored batches (stream sequence, bus sequence,
  count, stored time, topic, publisher stream) are kept in memory, read from
  the stream on open, so lookups by bus sequence and time, ``seq_for_last``
  and stats never scan messages.  Opening costs one read of the stream; a
  store of millions of messages would want this index persisted (later).
* **Retention** purges the oldest messages (``retain``) and records the next
  bus sequence in the bucket, so sequences are never reused; ``max_age`` and
  ``max_bytes`` given when the stream is created also become its own limits.
  ``replicas`` (1 to 5) is likewise set when the stream is created.  Opened
  again with other ``replicas``, ``max_age`` or ``max_bytes`` (given ones
  only), the existing stream is updated in place (``changes`` says what), or
  the change is refused with a UsageError when JetStream refuses it.

**The cloudevents format** (``message_format="cloudevents"``, the stream's
own, kept in the bucket under ``format``): one message per event in the
CloudEvents NATS binding, for NATS clients and CloudEvents SDKs that are not
eda: a text or JSON event in binary content mode (a ``ce-`` header per
attribute, the payload as the body), an envelope in structured content mode
(``Content-Type: application/cloudevents+json``, the event as published).
The ``Eda-*`` headers stay (``Eda-Count`` 1), so everything above holds;
reads join the runs of one batch's events into one record again.  A round
of many such messages waits for its acks as long as they keep coming
(``ACKS_PER_DEADLINE``).  JetStream's cost per message makes it slower.

Differences from the embedded engine, by design: what a group member holds
(``held``, ``release``) is this engine's view; when the engine itself dies,
JetStream redelivers what its members held after ``ack_wait``.  A group
message is acknowledged once all its events are, so a member that dies after
acknowledging part of a batch has the whole batch redelivered (at least
once).  A failed ``commit`` may have stored a prefix of the pending batches:
they are durable and read back; their publishers, unconfirmed, resend and
are told they are duplicates.  There is no ``fsync`` mode: JetStream's file
store and its quorum decide durability.

:func:`migrate` copies an embedded store into a stream (``eda-bus migrate``).

Modules, one job each: :mod:`.bridge` (the asyncio loop the engine's calls run
on), :mod:`.wire` (names, headers, message ids), :mod:`.state`, :mod:`.index`,
:mod:`.setup`, :mod:`.consumers`, :mod:`.groups`, :mod:`.stats` (the layers of
:class:`NatsEngine`), :mod:`.engine` (writing, retention), :mod:`.migrate`,
:mod:`.connect` (connecting, with NATS's security: :class:`NatsAuth`).
"""

from __future__ import annotations

from .client import nats
from .connect import NatsAuth, redact
from .engine import DEFAULT_STREAM, SERVE_DEADLINE, NatsEngine
from .migrate import Migrated, migrate
from .wire import nats_name

__all__ = [
    "DEFAULT_STREAM",
    "SERVE_DEADLINE",
    "Migrated",
    "NatsAuth",
    "NatsEngine",
    "migrate",
    "nats",
    "nats_name",
    "redact",
]
