"""Sans-IO Uptane verification: bytes + reference time in, typed results out."""
