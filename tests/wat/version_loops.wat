;; Passes self_test and every tick, then loops forever in version() (out of fuel).
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64) (local.get $t))
  (func (export "version") (result i32) (loop $forever (br $forever)) (i32.const 2)))
