"""The admin console: read-only HTML pages over the audit views and the monitor (:mod:`worker.console.pages`)."""
