"""The ECU simulator harness: whole vehicles, faults and attacks (DESIGN 9)."""
