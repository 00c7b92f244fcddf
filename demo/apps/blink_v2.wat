;; blink v2: the LED on actuator channel 0 blinks at half the rate of v1;
;; tick(t) returns t * 2 + the reading of sensor channel 0.
;; Capabilities: log, health, sensor.read, actuator.write.
(module
  (import "uptane" "log" (func $log (param i32 i32)))
  (import "uptane" "health" (func $health (param i32)))
  (import "uptane" "sensor_read" (func $sensor_read (param i32) (result i64)))
  (import "uptane" "actuator_write" (func $actuator_write (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "blink v2: self-test ok")
  (data (i32.const 32) "blink v2: actuator refused")

  (func (export "self_test") (result i32)
    ;; The sensor must answer and the LED must accept a write.
    (drop (call $sensor_read (i32.const 0)))
    (if (call $actuator_write (i32.const 0) (i64.const 0))
      (then (return (i32.const 2))))
    (call $log (i32.const 0) (i32.const 22))
    (call $health (i32.const 0))
    (i32.const 0))

  (func (export "tick") (param $t i64) (result i64)
    (if (call $actuator_write (i32.const 0)
          (i64.rem_u (i64.div_u (local.get $t) (i64.const 2)) (i64.const 2)))
      (then
        (call $log (i32.const 32) (i32.const 26))
        (call $health (i32.const 1))))
    (i64.add
      (i64.mul (local.get $t) (i64.const 2))
      (call $sensor_read (i32.const 0))))

  (func (export "version") (result i32) (i32.const 2)))
