"""Operations, at the bottom: Prometheus metrics, the readiness checks, and the small HTTP server they and
the console are served on. Imports nothing of the roles above it."""
