"""Assemble role: when a study is complete (:mod:`worker.assemble.completion`), decided by a periodic
sweep over ledger timestamps that also re-publishes lost work (:mod:`worker.assemble.sweeper`), and
the work of a dead predecessor taken back at start (:mod:`worker.assemble.recovery`)."""
