;; Grows memory one 64 KiB page at a time until memory.grow fails (returns -1);
;; exits with the number of pages it gained (at most 255 before it stops trying).
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $gained i32)
    (block $done
      (loop $again
        (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (local.set $gained (i32.add (local.get $gained) (i32.const 1)))
        (br_if $again (i32.lt_u (local.get $gained) (i32.const 255)))))
    (call $proc_exit (local.get $gained))))
