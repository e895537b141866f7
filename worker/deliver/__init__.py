"""Deliver role: each result object sent to each destination (:mod:`worker.deliver.send`: C-STORE),
with the retries and backoff of :mod:`worker.leases`."""
