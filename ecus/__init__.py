"""ECU code: primary and secondary orchestrators, transport, slots, WASM host."""
