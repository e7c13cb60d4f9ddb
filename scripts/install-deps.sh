#!/usr/bin/env bash
# Install what building and testing ngx.dyups needs on Debian 12 (bookworm).
#
# Idempotent: every requirement is checked first and apt-get runs only when
# something is missing. Needs root only in that case.
#
# The host is not ours: this script never stops, disables or reconfigures a
# service. The tests and the demo run their own nginx in private prefixes on
# their own ports, so a system nginx, running or not, is left exactly as it
# was. While it installs packages it keeps their postinst scripts from
# starting services (a policy-rc.d that it creates only when none exists, and
# removes afterwards), so installing Debian's nginx does not start a new
# service on port 80 behind the operator's back.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*"; }

# requirement -> Debian package. A requirement is a command name or an
# absolute file path.
reqs=(
  "nginx:nginx"
  "/usr/lib/nginx/modules/ngx_http_lua_module.so:libnginx-mod-http-lua"
  "/usr/lib/nginx/modules/ndk_http_module.so:libnginx-mod-http-ndk"
  "/usr/share/lua/5.1/resty/core.lua:lua-resty-core"
  "luajit:luajit2"
  "/usr/include/luajit-2.1/lua.h:libluajit2-5.1-dev"
  "busted:lua-busted"
  "wrk:wrk"
  "luacheck:lua-check"
  "curl:curl"
  "pkg-config:pkg-config"
  "/usr/bin/etcd:etcd-server"
  "/usr/bin/etcdctl:etcd-client"
  # The DNS server spec/dns_spec.lua starts on loopback. dnsmasq-base is the
  # binary alone: Debian's `dnsmasq` package adds a system service that its
  # postinst starts on port 53 (and would take the host's resolver over);
  # this one has no service to start, so a dnsmasq the host runs, or not,
  # is left exactly as it was.
  "/usr/sbin/dnsmasq:dnsmasq-base"
  # spec/metrics_spec.lua: `promtool check metrics`, and a Prometheus server
  # it starts itself on a free loopback port in its own temp directory.
  # Debian's package also brings a prometheus.service: its postinst is held
  # by the policy-rc.d below (not started), and the unit is disabled again
  # after the install (units_of), so the host runs no Prometheus because of
  # us.
  "promtool:prometheus"
  "prometheus:prometheus"
  # The headless browser that loads /dashboard (a program, no service).
  "chromium:chromium"
)

have() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ;;
  esac
}

missing=()
for r in "${reqs[@]}"; do
  what="${r%%:*}" pkg="${r#*:}"
  if have "$what"; then
    log "ok: $what"
  else
    log "missing: $what (package $pkg)"
    case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "not root; install these Debian packages first:"
    log "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
    exit 1
  fi
  # Keep the packages' postinst from starting nginx (or prometheus) where policy-rc.d is
  # honoured (invoke-rc.d); removed again afterwards if we created it.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  trap 'if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  # The boot-time services these packages would enable: undone after the
  # install for the ones this run brought (they were not on the host before,
  # so the host is left as it was; the tests start their own processes).
  units_of() {
    case "$1" in
      nginx) echo nginx.service ;;
      etcd-server) echo etcd.service ;;
      prometheus) echo prometheus.service ;;
    esac
  }
  log "apt-get update"
  apt-get update
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
  if [ -n "$made_policy" ]; then
    log "installed ${missing[*]}; no service was started (policy-rc.d held them for this install only)"
  else
    log "installed ${missing[*]}; the host's own /usr/sbin/policy-rc.d decided which services started"
  fi
  if command -v systemctl >/dev/null 2>&1; then
    for pkg in "${missing[@]}"; do
      unit="$(units_of "$pkg")"
      if [ -n "$unit" ] && systemctl --quiet is-enabled "$unit" 2>/dev/null; then
        # Works on the unit files whether or not systemd runs here.
        systemctl --quiet disable "$unit" >/dev/null 2>&1 || true
        log "$unit came with $pkg: left disabled at boot, as it was before (the tests start their own)"
      fi
    done
  fi
  for r in "${reqs[@]}"; do
    what="${r%%:*}"
    have "$what" || { log "still missing after install: $what"; exit 1; }
  done
fi

if ! command -v "${CARGO:-cargo}" >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  log "error: cargo not found; install a Rust toolchain (rustup) first"
  exit 1
fi

log "all dependencies present"
