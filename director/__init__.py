"""The Director repository: inventory, assignments, per-vehicle metadata (DESIGN 6)."""
