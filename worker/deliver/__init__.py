"""Deliver role: each result object sent to each destination (:mod:`worker.deliver.send`: C-STORE, or
DICOMweb STOW-RS with a QIDO-RS check in :mod:`worker.deliver.stow`), with the retries and backoff of
:mod:`worker.leases`."""
