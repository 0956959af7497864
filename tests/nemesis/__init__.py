"""The LAN nemesis (issue 18): real eda programs on namespaced hosts, faults, checkers.

See ``tests/nemesis/run.py`` for a run, ``checkers.py`` for the promises checked.
"""
