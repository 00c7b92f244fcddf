;; Imports health with a signature the ABI does not have.
(module
  (import "uptane" "health" (func $health (param i64) (result i32)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param i64) (result i64) (local.get 0)))
