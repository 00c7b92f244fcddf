"""Primary <-> secondary links (DESIGN 4)."""
