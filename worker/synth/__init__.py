"""Synthetic test studies: DICOM files made from public chest X-ray PNGs (``pleura synth``)."""
