#!/usr/bin/env bash
# bench/run.sh: what `make bench` runs. See bench/README.md.
#
#   make bench              # full mode (about 20 minutes on 2 cores)
#   make bench QUICK=1      # quick mode (about 5 minutes; QUICK=1 make bench too)
#   QUICK=1 bash bench/run.sh
#
# Environment: QUICK=1, SECTIONS=1234567 (a subset, e.g. SECTIONS=2),
# BENCH_JSON=path (raw results), NGINX_BIN, WRK, NGINX_MODULES_DIR, ETCD,
# BENCH_KEEP=1 (keep the temp prefixes with their error logs).
#
# Starts its own nginx instances (backends and proxies) in temp prefixes
# under /tmp, and for section 6 an etcd cluster and `dyups sync` agents, on
# loopback ports only, and stops every one of them on exit, on error and on
# Ctrl-C.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# --- prerequisites -------------------------------------------------------
WRK="${WRK:-wrk}"
command -v "$WRK" >/dev/null 2>&1 ||
  die "wrk not found: install the Debian package 'wrk' (make deps / scripts/install-deps.sh does)"
NGINX_BIN="${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
[ -x "$NGINX_BIN" ] || die "nginx not found: run 'make deps'"
mods="${NGINX_MODULES_DIR:-/usr/lib/nginx/modules}"
if ! "$NGINX_BIN" -V 2>&1 | grep -q lua-nginx-module && [ ! -e "$mods/ngx_http_lua_module.so" ]; then
  die "nginx has no lua module ($mods/ngx_http_lua_module.so missing): run 'make deps'"
fi
[ -f "$repo/lib/ngx/dyups.so" ] || die "lib/ngx/dyups.so is missing: run 'make build' first"
command -v python3 >/dev/null 2>&1 || die "python3 not found (the driver is bench/dyups_bench.py)"
sections="${SECTIONS:-1234567}"
ETCD="${ETCD:-/usr/bin/etcd}"
if [[ "$sections" == *6* ]]; then
  [ -x "$ETCD" ] || die "etcd not found ($ETCD): install the Debian package 'etcd-server' (make deps does), or leave section 6 out (SECTIONS=12345)"
  [ -x "${DYUPS_BIN:-$repo/bin/dyups}" ] || die "bin/dyups is missing: run 'make build' first"
fi
export NGINX_BIN WRK ETCD
unset NGINX  # nginx itself reads $NGINX (inherited sockets)
# The driver imports checks_bench.py: no bytecode left in the tree.
export PYTHONDONTWRITEBYTECODE=1

# --- temp root and cleanup -----------------------------------------------
root="$(mktemp -d /tmp/ngx-dyups-bench.XXXXXX)"
chmod 755 "$root"
driver=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$driver" ] && kill -0 "$driver" 2>/dev/null; then
    kill -TERM "$driver" 2>/dev/null || true
    wait "$driver" 2>/dev/null || true
  fi
  # Backstop: any nginx master still running from a prefix under $root.
  local pidf pid
  for pidf in "$root"/*/logs/nginx.pid; do
    [ -f "$pidf" ] || continue
    pid="$(cat "$pidf" 2>/dev/null || true)"
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then
      kill -QUIT "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      # the daemonized master leads its own process group, workers included
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  # Section 6's etcd members and agents, by the pid the driver recorded,
  # each only if its command line still names this run's directory.
  for pidf in "$root"/pids/*.pid; do
    [ -f "$pidf" ] || continue
    pid="$(cat "$pidf" 2>/dev/null || true)"
    [ -n "$pid" ] || continue
    if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$root"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  if [ "${BENCH_KEEP:-}" = 1 ]; then
    printf 'bench: prefixes kept in %s\n' "$root" >&2
  else
    rm -rf "$root"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

args=(--root "$root" --sections "$sections")
if [ -n "${QUICK:-}" ] && [ "${QUICK}" != 0 ]; then
  args+=(--quick)
  printf 'bench: QUICK mode (about 5 minutes)\n' >&2
else
  printf 'bench: full mode (about 20 minutes; QUICK=1 for the quick mode)\n' >&2
fi
[ -n "${BENCH_JSON:-}" ] && args+=(--json "$BENCH_JSON")

python3 -u "$here/dyups_bench.py" "${args[@]}" &
driver=$!
wait "$driver"
