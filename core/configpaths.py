"""Which config files apply: :func:`default_paths`, apart from :mod:`eda.core.config`.

``eda-X --help`` answered before click is imported (cli/launch.py) must know whether
a config file could change the defaults it shows, without paying for the parser's
imports (``re``, ``typing``): this module imports ``os`` only.
"""

import os


def default_paths(explicit: str | None) -> list[str]:
    """Config files that exist, lowest precedence first.

    Plain strings, not pathlib: this runs on every start, ``--help`` included.
    """
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    paths = [os.path.join(xdg, "eda", "config.toml"), "eda.toml"]
    found = [p for p in paths if os.path.isfile(p)]
    if explicit is not None:
        path = explicit
        if not os.path.isfile(path):
            from .errors import ConfigError

            raise ConfigError(f"{path}: config file not found")
        found.append(path)
    return found
