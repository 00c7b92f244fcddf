"""WAT sources of the demo apps (compiled by wasmtime at publish time)."""
