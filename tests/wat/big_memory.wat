;; Declares 64 pages up front; its start function traps, so running any code is visible.
(module
  (memory (export "memory") 64)
  (func $start unreachable)
  (start $start)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param i64) (result i64) (local.get 0)))
