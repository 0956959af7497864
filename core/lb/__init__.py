"""eda-lb: load balancing -- shell commands as services over ZeroMQ, and a TCP proxy.

- :mod:`.protocol` -- the frames between callers, the broker and workers;
- :mod:`.balancer` -- strategies and instance health (outlier ejection, slow start, panic);
- :mod:`.worker` -- a service instance that runs a shell command per request;
- :mod:`.caller` -- client-side balancing: the window, deadlines and retries, over
  :mod:`.callpool` (connections to instances) and :mod:`.callio` (input and ordered output);
- :mod:`.pins` -- secure mode: which instances found may be used, each pinned to its key;
- :mod:`.broker` -- the optional broker (``eda-lb serve``), with :mod:`.brokerqueue`,
  :mod:`.brokerworkers` and :mod:`.stats` (its figures, and asking for them);
- :mod:`.tcp` -- the TCP proxy: :mod:`.dataplane` (moving bytes), :mod:`.planes`
  (data-plane processes, fresh interpreters), :mod:`.tcpcheck` (health checks),
  :mod:`.follow` (the registry feed), :mod:`.proxystats` (its figures' stats socket,
  for ``eda-lb stats``); :mod:`.haproxy` and :mod:`.haproxycfg` -- HAProxy as the data
  plane instead.
"""
