;; Healthy until tick 2, where it reports health code 7.
(module
  (import "uptane" "health" (func $health (param i32)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (call $health (i32.const 0)) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (if (i64.eq (local.get $t) (i64.const 2))
      (then (call $health (i32.const 7)))
      (else (call $health (i32.const 0))))
    (local.get $t)))
