"""nats-py, the JetStream client, when installed (the ``eda[nats]`` extra); ``nats`` is
None otherwise, and the engine says how to install it."""

from __future__ import annotations

try:
    import nats
    from nats.errors import Error as NatsError
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js import api as jsapi
    from nats.js.errors import APIError as JsApiError
    from nats.js.errors import NotFoundError as JsNotFound
    from nats.js.errors import ServiceUnavailableError as ServiceUnavailable
except ImportError:  # pragma: no cover - the extra is not installed
    nats = None  # type: ignore[assignment]
    jsapi = None  # type: ignore[assignment]

    class NatsError(Exception):  # type: ignore[no-redef]
        """Stands in for nats-py's errors so that modules naming them still import."""

    NatsTimeout = JsApiError = JsNotFound = ServiceUnavailable = NatsError  # type: ignore[assignment,misc]

__all__ = [
    "JsApiError",
    "JsNotFound",
    "NatsError",
    "NatsTimeout",
    "ServiceUnavailable",
    "jsapi",
    "nats",
]
