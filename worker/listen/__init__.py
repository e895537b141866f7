"""Listen role: what the DICOM listener (:mod:`dicom_node.scp`) received, recorded in the ledger before
Success is answered (:mod:`worker.listen.receiver`), and several listener processes on one port
(:mod:`worker.listen.processes`)."""
