"""Studies with archived embeddings written straight into a ledger, for search and head tests."""

from __future__ import annotations

import numpy as np

from worker.embeddings import EmbeddingArchive
from worker.ledger import Instance, Job, Study
from worker.ledger.db import Ledger, utcnow


def archive_studies(ledger: Ledger, studies: dict[str, list[np.ndarray]],
                    bundle: tuple[str, str] = ("demo", "0.1.0")) -> None:
    """Each study ``uid`` DONE with one instance (``uid.1``, ``uid.2``...) per vector, stored by one job."""
    archive = EmbeddingArchive(ledger)
    now = utcnow()
    with ledger.session() as s:
        for uid, vectors in studies.items():
            study = Study(study_instance_uid=uid, state="DONE", revision=1, first_received_at=now,
                          last_received_at=now)
            s.add(study)
            s.flush()
            job = Job(study_id=study.id, revision=1, state="SUCCEEDED", created_at=now, attempts=1)
            instances = [Instance(study_id=study.id, sop_instance_uid=f"{uid}.{n}", sop_class_uid="1.2",
                                  series_instance_uid=f"{uid}.0", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                  spool_path="/dev/null", size_bytes=0, sha256="0" * 64, received_at=now)
                         for n in range(1, len(vectors) + 1)]
            s.add_all([job, *instances])
            s.flush()
            archive.store(s, job_id=job.id, study_id=study.id, bundle_name=bundle[0], bundle_version=bundle[1],
                          vectors=[(i.id, v) for i, v in zip(instances, vectors, strict=True)], now=now)
