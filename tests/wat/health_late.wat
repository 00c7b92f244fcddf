;; Passes its self-test and any confirmation window shorter than 100 ticks,
;; then reports health code 5 from tick 100 on (a bad payload a canary catches).
(module
  (import "uptane" "health" (func $health (param i32)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (call $health (i32.const 0)) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (if (i64.ge_s (local.get $t) (i64.const 100))
      (then (call $health (i32.const 5)))
      (else (call $health (i32.const 0))))
    (local.get $t)))
