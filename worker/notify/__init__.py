"""Notify role: tell the RIS / worklist about each analysed result (HL7 v2 ORU^R01 over MLLP,
FHIR R4 transaction Bundles), with a ledger row per (result, destination). docs/hl7.md is the
interface specification."""
