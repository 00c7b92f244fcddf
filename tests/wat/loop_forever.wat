;; self_test never returns: only fuel stops it.
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32)
    (loop $forever (br $forever))
    (i32.const 0))
  (func (export "tick") (param i64) (result i64) (local.get 0)))
