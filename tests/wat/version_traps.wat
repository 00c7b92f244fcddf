;; Passes self_test and every tick, then traps in version() (issue 10 item 1).
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64) (local.get $t))
  (func (export "version") (result i32) unreachable))
