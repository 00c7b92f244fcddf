;; blink v1: the LED on actuator channel 0 follows t mod 2; tick(t) returns t.
;; Capabilities: log, health, actuator.write.
(module
  (import "uptane" "log" (func $log (param i32 i32)))
  (import "uptane" "health" (func $health (param i32)))
  (import "uptane" "actuator_write" (func $actuator_write (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "blink v1: self-test ok")
  (data (i32.const 32) "blink v1: actuator refused")

  (func (export "self_test") (result i32)
    ;; 7 * 6 must be 42, and the LED must accept a write.
    (if (i32.ne (i32.mul (i32.const 7) (i32.const 6)) (i32.const 42))
      (then (return (i32.const 1))))
    (if (call $actuator_write (i32.const 0) (i64.const 0))
      (then (return (i32.const 2))))
    (call $log (i32.const 0) (i32.const 22))
    (call $health (i32.const 0))
    (i32.const 0))

  (func (export "tick") (param $t i64) (result i64)
    (if (call $actuator_write (i32.const 0) (i64.rem_u (local.get $t) (i64.const 2)))
      (then
        (call $log (i32.const 32) (i32.const 26))
        (call $health (i32.const 1))))
    (local.get $t))

  (func (export "version") (result i32) (i32.const 1)))
