"""eda command-line programs: one module per program plus shared plumbing (common.py)."""

# program name -> module; man pages, completions and tests iterate over this
PROGRAMS = {
    "eda-pub": "eda.cli.pub",
    "eda-sub": "eda.cli.sub",
    "eda-registry": "eda.cli.registry",
    "eda-bus": "eda.cli.bus",
    "eda-lb": "eda.cli.lb",
    "eda-txn": "eda.cli.txn",
    "eda-keys": "eda.cli.keys",
}
