;; self_test grows memory one page at a time until it is refused, then aborts
;; the way an allocator does on out-of-memory.
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable)
  (func (export "tick") (param i64) (result i64) (local.get 0)))
