"""The Image repository: offline-keyed metadata edits and HTTP serving (DESIGN 1)."""
