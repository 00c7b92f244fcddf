;; Imports actuator_write; its start function logs, so running any code is visible.
(module
  (import "uptane" "log" (func $log (param i32 i32)))
  (import "uptane" "actuator_write" (func $actuator_write (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "start ran")
  (func $start (call $log (i32.const 0) (i32.const 9)))
  (start $start)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (i64.extend_i32_s (call $actuator_write (i32.const 0) (local.get $t)))))
