"""Radiology reports from the RIS: received (HL7 v2 ORU^R01 over MLLP, FHIR R4 DiagnosticReport),
matched to their studies, and labelled per finding from their text, so that
:mod:`worker.monitor` can say how the model does on this site's patients.

- :mod:`worker.reports.labeler`: the labeler interface (report text -> present / absent / uncertain
  per finding); :mod:`worker.reports.rules`: the rule-based default
- :mod:`worker.reports.hl7_in` and :mod:`worker.reports.mllp`: ORU^R01 over MLLP; :mod:`worker.reports.fhir_in`:
  DiagnosticReport POSTs on the HTTP port
- :mod:`worker.reports.store`: record a received report, match reports to studies
- :mod:`worker.reports.labels`: the study labels the current reports give (monitor, heads)
"""
