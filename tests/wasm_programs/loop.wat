;; Loops forever without any host call: only fuel or the epoch deadline can stop it.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever (br $forever))))
