;; A bad payload for the campaign demo (`uptane sim --bad-payload`): it passes
;; its self-test and its confirmation window (ticks below 50), then reports
;; health code 3 on every tick from 50 on. Only a canary that keeps watching
;; the module after its trial catches it.
(module
  (import "uptane" "health" (func $health (param i32)))
  (import "uptane" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "sensor drift")
  (func (export "self_test") (result i32) (call $health (i32.const 0)) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (if (i64.ge_s (local.get $t) (i64.const 50))
      (then
        (call $log (i32.const 0) (i32.const 12))
        (call $health (i32.const 3)))
      (else (call $health (i32.const 0))))
    (local.get $t))
  (func (export "version") (result i32) (i32.const 2)))
