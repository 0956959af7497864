"""eda-lb: load balancing -- shell commands as services over ZeroMQ, and a TCP proxy.

- :mod:`.protocol` -- the frames between callers, the broker and workers;
- :mod:`.balancer` -- strategies and instance health (outlier ejection, slow start, panic);
- :mod:`.worker` -- a service instance that runs a shell command per request;
- :mod:`.caller` -- client-side balancing: pipelined requests, retries, ordered replies;
- :mod:`.broker` -- the optional broker (``eda-lb serve``);
- :mod:`.tcp` and :mod:`.haproxy` -- the TCP proxy and its HAProxy data plane.
"""
