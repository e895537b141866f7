"""Alembic migrations for the ledger (run with ``pleura db upgrade``)."""
