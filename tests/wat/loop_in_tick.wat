;; Passes self_test, then loops forever from tick 3 on (inside the confirmation window).
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (if (i64.ge_s (local.get $t) (i64.const 3))
      (then (loop $forever (br $forever))))
    (local.get $t)))
