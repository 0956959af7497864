"""eda-registry's core: service registration, discovery, health and change streams.

Modules, each small: :mod:`.model` (the record and its validation),
:mod:`.store` (state, expiry, events, replication rules), :mod:`.persist`
(log + snapshot), :mod:`.protocol` (wire messages), :mod:`.server` (the
daemon's poll loop), :mod:`.client` (finding and asking registries, failover),
:mod:`.agent` (keeping one instance registered), :mod:`.health` (checks with
rise/fall), :mod:`.watch` (the change stream across reconnects),
:mod:`.dns` (the ``NAME.service.eda`` DNS interface), :mod:`.serverless`
(mDNS-only mode) and :mod:`.browse` (any DNS-SD type).
"""
