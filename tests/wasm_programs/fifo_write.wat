;; Opens /work/fifo and reads one byte from it (both block until the host writes), then, in
;; straight-line code, creates /work/after-fifo.txt in preopen fd 3 and prints "done".
;; A module released from a blocking host call after its run was stopped must not touch
;; the host again.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "fifo")
  (data (i32.const 112) "after-fifo.txt")
  (data (i32.const 128) "written after fifo\n")
  (data (i32.const 160) "done\n")
  (func (export "_start")
    ;; path_open(3, "fifo", no oflags, right fd_read (2)) -> fd at 304
    (drop (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 4)
      (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 304)))
    ;; fd_read(fd, iovec {base 400, len 1}) -> nread at 308
    (i32.store (i32.const 0) (i32.const 400))
    (i32.store (i32.const 4) (i32.const 1))
    (drop (call $fd_read (i32.load (i32.const 304)) (i32.const 0) (i32.const 1) (i32.const 308)))
    ;; path_open(3, "after-fifo.txt", O_CREAT, right fd_write (64)) -> fd at 312
    (drop (call $path_open (i32.const 3) (i32.const 0) (i32.const 112) (i32.const 14)
      (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 312)))
    (i32.store (i32.const 0) (i32.const 128))
    (i32.store (i32.const 4) (i32.const 19))
    (drop (call $fd_write (i32.load (i32.const 312)) (i32.const 0) (i32.const 1) (i32.const 308)))
    (i32.store (i32.const 0) (i32.const 160))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 308)))))
