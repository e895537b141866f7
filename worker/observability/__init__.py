"""Operations: HTTP health, readiness and metrics endpoints, and the read-only admin console."""
