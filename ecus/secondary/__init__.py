"""A secondary ECU: partial verification, A/B WASM slots and the module's trial.

Map: ``ecu`` (``Secondary``: the bus-facing message handler, Uptane 2.1
5.4.3/5.4.4.1), ``config`` (``SecondaryConfig``, the JSON config file),
``slots`` (the A/B slot store with atomic, power-cut-safe writes) and
``wasm_host`` (wasmtime host: fuel, memory cap, capability-gated host
functions, the trial).
"""

from ecus.secondary.ecu import DEFAULT_MAX_TIME_AHEAD, Secondary

__all__ = ["DEFAULT_MAX_TIME_AHEAD", "Secondary"]
