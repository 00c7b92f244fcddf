;; Every tick tries 10 actuator writes and returns how many were refused.
(module
  (import "uptane" "actuator_write" (func $actuator_write (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64)
    (local $i i32) (local $refused i64)
    (loop $again
      (if (i32.eq (call $actuator_write (i32.const 1) (local.get $t)) (i32.const -1))
        (then (local.set $refused (i64.add (local.get $refused) (i64.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 10))))
    (local.get $refused)))
