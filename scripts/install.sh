#!/usr/bin/env bash
# Idempotent setup: Debian packages (when root), then a .venv with kavach and its dev tools.
# Not root and a package missing: name it and stop, so nothing runs weaker than the tests expect.
set -euo pipefail
cd "$(dirname "$0")/.."

# One list, one place. Each line: package, and why kavach needs it.
APT_PACKAGES=(
  libseccomp2                 # seccomp BPF through pyseccomp (Process backend)
  python3-venv                # the .venv below
  runc                        # OCI backend runtime
  umoci                       # unpacking OCI image layouts for the OCI backend
  crun                        # probed by the OCI backend (refused on cgroup-v1 hybrid hosts; a test shows it)
  golang-github-opencontainers-specs-dev   # the runtime-spec JSON schema the OCI bundle tests validate against
  bubblewrap                  # benchmark anchor only (benchmarks/bench_process.py)
  clang lld wasi-libc libclang-rt-14-dev-wasm32   # compiling C test programs to wasm32-wasi
  curl                        # sandboxed HTTP client in the proxy tests
  iproute2                    # `ip` inside network namespaces
  tinyproxy                   # benchmark peer for the egress proxy
  procps                      # ps/pgrep used by leak checks
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "install: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "install: missing Debian packages: ${missing[*]}" >&2
    echo "install: run 'sudo apt-get install ${missing[*]}' (or 'sudo make install') and try again" >&2
    exit 1
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kavach-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[all,dev]"
  touch "$stamp"
fi
echo "install: ok (.venv ready)"
