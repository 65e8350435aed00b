#!/usr/bin/env bash
# hasten's set-up, idempotent and cached outside the clone. Prints the path of an env file to `source`.
#
#   libtorch 2.11.0  an existing torch 2.11 (HASTEN_LIBTORCH, /opt/torch/.venv, $VIRTUAL_ENV), else a venv
#                    in the cache with PyPI's wheel (install/requirements-torch-cpu.txt)
#   test clients     jupyter_client, nbclient, nbformat, jupyter_kernel_test, pytest, tensorboard in a cached venv,
#                    pinned by install/requirements-test.lock
#   cargo-nextest    the test runner, if the toolchain lacks it
#   rust-src         the standard library's source, for completions in the Jupyter kernel
#   crates           every package of Cargo.lock in cargo's registry (notebooks resolve them offline)
#   env.sh           LIBTORCH, CARGO_TARGET_DIR (cached build output), HASTEN_PYTHON
#
# A second run only checks stamps and finishes in well under a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${HASTEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hasten}
torch_version=2.11.0
mkdir -p "$cache"

log() { echo "[hasten install] $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
command -v c++ >/dev/null || die "no C++ compiler (c++): tch compiles a C++ wrapper (apt-get install g++)"
command -v python3 >/dev/null || die "python3 not found: it provides libtorch (pip) and the test clients"

# The version a torch package folder holds, read from its version.py without importing torch (fast).
torch_dir_version() {
  sed -n "s/^__version__ = ['\"]\([^'\"]*\)['\"].*/\1/p" "$1/version.py" 2>/dev/null | head -n1
}

usable_torch() { # $1: a torch package folder
  local v
  [[ -f "$1/lib/libtorch_cpu.so" && -d "$1/include/torch" ]] || return 1
  v=$(torch_dir_version "$1")
  [[ "${v%%+*}" == "$torch_version" ]]
}

find_torch() {
  local candidate
  if [[ -n "${HASTEN_LIBTORCH:-}" ]]; then
    usable_torch "$HASTEN_LIBTORCH" || die "HASTEN_LIBTORCH=$HASTEN_LIBTORCH is not a torch $torch_version folder"
    echo "$HASTEN_LIBTORCH"; return
  fi
  for candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV"/lib/python3*/site-packages/torch} \
                   /opt/torch/.venv/lib/python3*/site-packages/torch \
                   "$cache"/torch-$torch_version/lib/python3*/site-packages/torch; do
    if usable_torch "$candidate" && [[ "$candidate" != "$cache"/* || -f "$cache/torch-$torch_version/.complete" ]]; then
      echo "$candidate"; return
    fi
  done
  return 1
}

if ! libtorch=$(find_torch); then
  venv="$cache/torch-$torch_version"
  log "installing libtorch $torch_version into $venv (about 540 MB, once)"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$here/requirements-torch-cpu.txt"
  touch "$venv/.complete"
  libtorch=$(find_torch) || die "libtorch $torch_version still not found after installing it into $venv"
fi

# Python test clients: reinstalled only when the lock file changes.
pytools="$cache/pytools"
lock_sum=$(sha256sum "$here/requirements-test.lock" | cut -d' ' -f1)
if [[ "$(cat "$pytools/.stamp" 2>/dev/null)" != "$lock_sum" ]]; then
  log "installing the Python test clients into $pytools"
  [[ -x "$pytools/bin/python" ]] || python3 -m venv "$pytools"
  "$pytools/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements-test.lock"
  echo "$lock_sum" > "$pytools/.stamp"
fi

# The kernel's completions come from rust-analyzer, which reads the standard library's source.
if [[ ! -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ]]; then
  if command -v rustup >/dev/null; then
    log "adding the rust-src component (for completions in the Jupyter kernel)"
    rustup component add rust-src >&2
  else
    log "warning: rust-src is missing and rustup is not here: the kernel's completions will lack std"
  fi
fi

# Every package Cargo.lock names, for every target. Builds download only what this platform compiles,
# but the Jupyter kernel resolves notebooks offline against this lock file (evcxr runs `cargo metadata
# --offline` over it), and cargo then wants all of them, also those only another platform needs. The
# check is one offline `cargo metadata` (~0.3 s); the download happens once per cargo registry.
workspace=$(dirname "$here")
if ! cargo metadata --locked --offline --format-version 1 --manifest-path "$workspace/Cargo.toml" >/dev/null 2>&1; then
  log "downloading the crates Cargo.lock names (for every target: notebooks resolve them offline)"
  cargo fetch --locked --manifest-path "$workspace/Cargo.toml" >&2 ||
    die "cargo fetch --locked failed: the kernel needs every crate of Cargo.lock in cargo's registry (${CARGO_HOME:-$HOME/.cargo})"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest (once)"
  cargo install --locked --quiet cargo-nextest
fi

env_file="$cache/env.sh"
new_env=$(cat <<EOT
# Written by hasten's install/bootstrap.sh; source it before running cargo by hand.
export HASTEN_CACHE="$cache"
export LIBTORCH="$libtorch"
export CARGO_TARGET_DIR="\${CARGO_TARGET_DIR:-$cache/target}"
export HASTEN_PYTHON="$pytools/bin/python"
export PATH="$pytools/bin:\$PATH"
EOT
)
if [[ "$(cat "$env_file" 2>/dev/null)" != "$new_env" ]]; then
  echo "$new_env" > "$env_file"
  log "libtorch: $libtorch ($(torch_dir_version "$libtorch"))"
fi
echo "$env_file"
