;; A WASI 0.2 command component that grows its memory one page at a time until
;; memory.grow fails; wasi:cli/run returns ok (exit 0) only if it gained exactly 15 pages,
;; i.e. its memory stopped at 16 pages = 1 MiB (the per-memory share of a 2 MiB limit).
(component
  (core module $m
    (memory 1)
    (func (export "run") (result i32)
      (local $gained i32)
      (block $done
        (loop $again
          (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
          (local.set $gained (i32.add (local.get $gained) (i32.const 1)))
          (br_if $again (i32.lt_u (local.get $gained) (i32.const 4096)))))
      (i32.ne (local.get $gained) (i32.const 15))))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $runinst (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $runinst)))
