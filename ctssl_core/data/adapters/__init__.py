"""Label adapters for the formats real datasets ship: RSNA-PE train.csv, LIDC-IDRI XML reads, demographics CSV.

Each adapter reads its sidecar keyed by raw DICOM identifiers *inside ingest only*;
what reaches the catalog is keyed by pseudonyms (``data/pseudonym.py``).
"""
