;; tick(t) asks for t more pages and returns memory.grow's answer (-1 = refused)
;; and the memory size in the high half: a module that copes with a refusal.
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 32))
      (i64.extend_i32_u (memory.grow (i32.wrap_i64 (local.get $t)))))))
