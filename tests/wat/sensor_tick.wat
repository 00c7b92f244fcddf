;; Every tick returns the reading of sensor 0 (a host call in each tick).
(module
  (import "uptane" "sensor_read" (func $sensor_read (param i32) (result i64)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64) (call $sensor_read (i32.const 0)))
  (func (export "version") (result i32) (i32.const 1)))
