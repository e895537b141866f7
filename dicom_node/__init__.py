"""Pleura's DICOM node: SCP, spool, pixel decoding, result objects, SCU. Speaks DICOM only."""
