;; Passes its self-test and any confirmation window shorter than 100 ticks,
;; then traps (unreachable) from tick 100 on.
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (if (i64.ge_s (local.get $t) (i64.const 100)) (then (unreachable)))
    (local.get $t)))
