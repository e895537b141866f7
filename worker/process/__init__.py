"""Process role: one claimed job from stored instances to result objects and delivery rows.

:mod:`worker.process.jobs` (claiming with a lease), :mod:`worker.process.eligibility` (the bundle's
intended use), :mod:`worker.process.prepare` and :mod:`worker.process.cache` (decode and infer each
image on arrival), :mod:`worker.process.pipeline` (the job), :mod:`worker.process.result_objects`
(the SR and SCs, built and written).
"""
