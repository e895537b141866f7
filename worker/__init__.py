"""Pleura's application: settings, the ledger, Celery tasks, the pipeline and the CLI."""
