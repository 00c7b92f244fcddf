"""Loopback HTTP helpers for tests: re-exported from the simulator harness."""

from ecus.sim.http import Override, Switchboard, endless, fixed, serve, trickle

__all__ = ["Override", "Switchboard", "endless", "fixed", "serve", "trickle"]
