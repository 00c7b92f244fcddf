;; Logs from a pointer beyond the end of its memory.
(module
  (import "uptane" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32)
    (call $log (i32.const 65530) (i32.const 100))
    (i32.const 0))
  (func (export "tick") (param i64) (result i64) (local.get 0)))
