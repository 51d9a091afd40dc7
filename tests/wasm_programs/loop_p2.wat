;; A WASI 0.2 command component that loops forever inside wasi:cli/run.
(component
  (core module $m
    (func (export "run") (result i32)
      (loop $forever (br $forever))
      i32.const 0))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $runinst (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $runinst)))
