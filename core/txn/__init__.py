"""eda-txn: distributed transactions -- two-phase commit and sagas with compensation.

- :mod:`.journal` -- the durable JSON Lines log both use (fsync, group commit, torn-tail repair);
- :mod:`.crash` -- named crash points for recovery tests (``EDA_CRASH_AT``);
- two-phase commit: coordinator, participant, and their protocol;
- sagas: the TOML saga file, the executor, resume.
"""
