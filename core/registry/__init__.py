"""eda-registry's core: service registration, discovery, health and change streams.

Modules, each small: :mod:`.model` (the record and its validation),
:mod:`.store` (state, expiry, events, replication rules), :mod:`.persist`
(log + snapshot), :mod:`.protocol` (wire messages), :mod:`.server` (the
daemon's poll loop), :mod:`.client` (finding and asking registries, failover),
:mod:`.agent` (keeping one instance registered), :mod:`.health` (checks with
rise/fall), :mod:`.watch` (the change stream across reconnects),
:mod:`.dns` (the ``NAME.service.eda`` DNS interface), :mod:`.serverless`
(mDNS-only mode), :mod:`.browse` (any DNS-SD type) and :mod:`.access` (one
call each to look a service up, register, or follow changes, with the
fallback from registry to mDNS: what every program using the registry needs).
"""
