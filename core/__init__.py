"""eda core library: transport, wire codec, envelope, discovery and config.

Nothing here prints, exits or imports click/rich; errors are raised as
subclasses of :class:`eda.core.errors.EdaError`.
"""

__version__ = "0.1.0"
