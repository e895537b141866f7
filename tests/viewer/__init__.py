"""The OHIF viewer test's harness: Orthanc DICOMweb + nginx + the pinned OHIF build + headless Chromium (ohif.py)."""
