"""The model bundles this site has: built-in and installed, found by name, trusted by key
(:mod:`worker.bundles.catalogue`)."""
