"""uptane-wasm core library: Uptane metadata, verification and codecs.

No sockets, HTTP, CAN or disk state here beyond what callers pass in
(DESIGN 1). Importing this package has no side effects.
"""

__version__ = "0.1.0"
