"""Brokerless publish/subscribe over ZeroMQ XPUB/SUB sockets, wired by mDNS.

Both sides can connect: a subscriber binds an ephemeral port and announces
it (``_eda-sub._tcp``), so a publisher that starts later connects straight to
every running subscriber and waits until each one's subscriptions have
arrived before sending (the slow-joiner fix); a streaming publisher also
binds and announces (``_eda-pub._tcp``), so subscribers that start later
connect to it.  The welcome message and beacon subscriptions of
:mod:`eda.core.codec` tell each side who is already connected to it, so a
pair never ends up with two connections; sequence numbers drop any
duplicate that a race still lets through.

Loss is accounted on both sides (README, "Loss is never silent"):

* Publisher sockets set ``ZMQ_IMMEDIATE``, so a subscriber whose connection
  drops (killed, exited) loses its queue at once instead of blocking
  ``--block`` forever.  (No ZMTP heartbeats: libzmq 4.3 stops them while a
  queue is full and can abort on them once a full connection closes; and a
  frozen peer cannot be told from a slow reader at the TCP level.)
  XPUB then hands up the removal of that subscriber's beacon subscription,
  which tells the publisher *who* went; unless it is back within
  ``GONE_GRACE`` seconds it is reported with the number of events it missed.
* At the end, :meth:`Publisher.finish` sends every subscriber an
  end-of-stream message (addressed by its beacon, so only it receives it)
  carrying, per topic, the first sequence due to it (when it joined) and the
  next sequence.  The subscriber reports any head or tail gap it shows and
  acknowledges by subscribing to ``\\0A<pubid> <subid> <lost>`` (and
  unsubscribing at once).  The end is resent until acknowledged or the
  linger runs out; what was not confirmed is reported by the publisher.
* A subscriber that leaves on purpose (``-C``, SIGINT) says goodbye
  (``\\0B<subid>``), so its departure is not reported as loss.

None of this touches the per-event path: it costs one message per subscriber
at the end and a few control messages when subscribers come and go.

Secure mode (:mod:`eda.core.security`, turned on before a node is made):
every connection is CURVE.  A node announces its public key (TXT ``k``) and
connects only to discovered peers whose announced key it trusts, pinning
that key (CURVE proves the peer holds it); a peer announcing an untrusted
key, or none, is skipped and handed to :attr:`_Node.on_ignored`.  Peers
connecting to a node's bound port are admitted by the ZAP handler (trusted
keys only).  An explicit ``--connect`` names the server's trusted name,
``NAME@tcp://HOST:PORT``.  The socket monitor reports a server refusing
this key (``EVENT_HANDSHAKE_FAILED_AUTH``) within milliseconds; the
connection is then dropped and the refusal handed to :attr:`_Node.on_refused`.
"""

from .node import (
    CLOSE_LINGER,
    END_RESEND,
    GONE_GRACE,
    HANDSHAKE_TIMEOUT,
    MAX_DISCOVERED,
    MAX_EVENTS_PER_RECEIVE,
    MAX_PEERS,
    MAX_STREAMS,
    QUEUE_BYTES,
    UNREADY_AFTER,
    LossCallback,
    ephemeral_endpoint,
    new_id,
)
from .publisher import Departure, Outcome, Publisher
from .subscriber import Subscriber

__all__ = [
    "CLOSE_LINGER",
    "END_RESEND",
    "GONE_GRACE",
    "HANDSHAKE_TIMEOUT",
    "MAX_DISCOVERED",
    "MAX_EVENTS_PER_RECEIVE",
    "MAX_PEERS",
    "MAX_STREAMS",
    "QUEUE_BYTES",
    "UNREADY_AFTER",
    "Departure",
    "LossCallback",
    "Outcome",
    "Publisher",
    "Subscriber",
    "ephemeral_endpoint",
    "new_id",
]
