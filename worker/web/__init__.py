"""The HTTP side of every Pleura process: one ASGI stack (Starlette on uvicorn) for health, readiness,
metrics, the console, FHIR reports in and DICOMweb."""
