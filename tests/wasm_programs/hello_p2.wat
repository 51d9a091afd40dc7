;; A WASI 0.2 command component (hand-written, no toolchain needed): writes
;; "hello from a component" to stdout through wasi:cli/stdout and wasi:io/streams,
;; then returns ok from wasi:cli/run.
(component
  (import "wasi:io/error@0.2.0" (instance $error
    (export "error" (type (sub resource)))))
  (alias export $error "error" (type $error-type))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (export "output-stream" (type $output-stream (sub resource)))
    (alias outer 1 $error-type (type $error-outer))
    (export "error" (type $error (eq $error-outer)))
    (type $own-error (own $error))
    (type $stream-error' (variant (case "last-operation-failed" $own-error) (case "closed")))
    (export "stream-error" (type $stream-error (eq $stream-error')))
    (type $borrow-stream (borrow $output-stream))
    (type $bytes (list u8))
    (type $write-result (result (error $stream-error)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" $borrow-stream) (param "contents" $bytes) (result $write-result)))))
  (alias export $streams "output-stream" (type $output-stream-type))
  (import "wasi:cli/stdout@0.2.0" (instance $stdout
    (alias outer 1 $output-stream-type (type $os-outer))
    (export "output-stream" (type $os (eq $os-outer)))
    (type $own-os (own $os))
    (export "get-stdout" (func (result $own-os)))))

  (core module $mem (memory (export "memory") 1))
  (core instance $memi (instantiate $mem))
  (alias core export $memi "memory" (core memory $memory))

  (core func $get_stdout (canon lower (func $stdout "get-stdout")))
  (core func $write (canon lower (func $streams "[method]output-stream.blocking-write-and-flush")
    (memory $memory)))

  (core module $main
    (import "env" "memory" (memory 1))
    (import "host" "get-stdout" (func $get_stdout (result i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (data (i32.const 16) "hello from a component\n")
    (func (export "run") (result i32)
      (call $write (call $get_stdout) (i32.const 16) (i32.const 23) (i32.const 64))
      i32.const 0))
  (core instance $maini (instantiate $main
    (with "env" (instance (export "memory" (memory $memory))))
    (with "host" (instance (export "get-stdout" (func $get_stdout)) (export "write" (func $write))))))

  (func $run (result (result)) (canon lift (core func $maini "run")))
  (instance $runinst (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $runinst))
)
