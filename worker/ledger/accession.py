"""How the ledger keys an Accession Number: studies and their reports are matched on this hash,
and the number itself is never kept."""

from __future__ import annotations

import hashlib


def accession_key(accession_number: str) -> str:
    """The hash by which a study and its reports are matched (the Accession Number is not kept)."""
    return hashlib.sha256(f"pleura-accession|{accession_number.strip()}".encode()).hexdigest()
