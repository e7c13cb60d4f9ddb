#!/usr/bin/env bash
# scripts/demo.sh: run the ngx.dyups demo (examples/nginx.conf) in the
# foreground: one nginx, two workers, on 127.0.0.1:8080, 8081 and 8088-8090.
# EXAMPLE=NAME runs examples/NAME/ instead (from-upsops, from-dyups: the two
# source documents' configurations), on the ports its nginx.conf listens on.
# Ctrl-C stops it and removes its temporary prefix (KEEP=1 keeps the prefix).
#
# Environment: NGINX (the nginx or openresty binary), KEEP=1, EXAMPLE,
# NGINX_MODULES_DIR (Debian's dynamic modules, default /usr/lib/nginx/modules),
# DEMO_PORTS="8080=18080 8081=18081 ..." (run on other ports: the specs do,
# as the demo's may be taken).
set -euo pipefail

# A non-interactive shell cannot trap a signal that was ignored when it
# started, and a job started with `&` from a script starts with SIGINT
# ignored: start over with the default disposition so `kill -INT` (and
# Ctrl-C) always reach the trap below.
if [[ -z ${DYUPS_DEMO_SIGNALS_RESET:-} ]] && env --default-signal=INT true 2>/dev/null; then
    export DYUPS_DEMO_SIGNALS_RESET=1
    exec env --default-signal=INT,TERM,HUP bash "${BASH_SOURCE[0]}" "$@"
fi
unset DYUPS_DEMO_SIGNALS_RESET

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODULES_DIR=${NGINX_MODULES_DIR:-/usr/lib/nginx/modules}

die() { echo "demo: $*" >&2; exit 1; }

EXAMPLE=${EXAMPLE:-}
if [[ -n $EXAMPLE ]]; then
    if [[ ! $EXAMPLE =~ ^[a-z0-9][a-z0-9-]*$ || ! -f $REPO/examples/$EXAMPLE/nginx.conf ]]; then
        die "no example '$EXAMPLE': there are $(cd "$REPO/examples" && ls -d -- */ 2>/dev/null | tr -d / | tr '\n' ' ')"
    fi
    SRC=$REPO/examples/$EXAMPLE
else
    SRC=$REPO/examples
fi

# DEMO_PORTS: each `127.0.0.1:PORT` of the configuration and of the
# instructions becomes `127.0.0.1:NEW`.
declare -A MOVED=()
for pair in ${DEMO_PORTS:-}; do
    [[ $pair =~ ^([0-9]+)=([0-9]+)$ ]] || die "DEMO_PORTS: '$pair' is not PORT=PORT"
    MOVED[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
moved() {
    local expr=() from
    for from in "${!MOVED[@]}"; do expr+=(-e "s/127\.0\.0\.1:$from\b/127.0.0.1:${MOVED[$from]}/g"); done
    if ((${#expr[@]})); then sed -E "${expr[@]}"; else cat; fi
}

# The ports: those its nginx.conf listens on.
mapfile -t PORTS < <(grep -oE 'listen +127\.0\.0\.1:[0-9]+' "$SRC/nginx.conf" | moved | grep -oE '[0-9]+$' | sort -un)
((${#PORTS[@]})) || die "$SRC/nginx.conf listens on no 127.0.0.1 port"

find_nginx() {
    if [[ -n ${NGINX:-} ]]; then echo "$NGINX"; return; fi
    local p
    for p in "$(command -v openresty || true)" "$(command -v nginx || true)" \
             /usr/local/openresty/bin/openresty /usr/local/openresty/nginx/sbin/nginx /usr/sbin/nginx; do
        if [[ -n $p && -x $p ]]; then echo "$p"; return; fi
    done
    die "no nginx found: install OpenResty or nginx with the lua module (make deps), or set NGINX=/path/to/nginx"
}

# --- checks --------------------------------------------------------------------------

[[ -f $REPO/lib/ngx/dyups.so ]] || die "$REPO/lib/ngx/dyups.so is missing: run 'make build' first"
if [[ -z $EXAMPLE ]]; then
    for f in nginx.conf upstream.conf; do
        [[ -f $REPO/examples/$f ]] || die "$REPO/examples/$f is missing"
    done
fi
NGINX=$(find_nginx)

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
taken=()
for p in "${PORTS[@]}"; do
    if port_taken "$p"; then taken+=("$p"); fi
done
if ((${#taken[@]})); then
    echo "demo: port(s) ${taken[*]} on 127.0.0.1 already in use; the demo needs ${PORTS[*]}." >&2
    if command -v ss >/dev/null; then
        echo "demo: listening there now:" >&2
        for p in "${taken[@]}"; do ss -ltnpH "sport = :$p" >&2 || true; done
    fi
    echo "demo: stop whatever listens there (another demo?) and try again." >&2
    exit 1
fi

# --- the prefix ----------------------------------------------------------------------

PREFIX=$(mktemp -d /tmp/ngx-dyups-demo.XXXXXX)
MASTER=
STOPPED=

# true while pid runs (a zombie, exited but not reaped yet, does not count)
alive() {
    local s
    if [[ -r /proc/$1/stat ]]; then
        s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
        s=${s##*) }
        [[ $s != Z* && $s != X* ]]
    else
        kill -0 "$1" 2>/dev/null
    fi
}

# QUIT (graceful: the master exits once its workers have), then after 5s
# KILL nginx's whole process group (it runs in its own session).
stop_nginx() {
    [[ -n $MASTER ]] || return 0
    local pid=$MASTER i
    MASTER=
    if alive "$pid"; then
        echo "demo: stopping nginx (master $pid) ..." >&2
        kill -QUIT "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            echo "demo: nginx did not quit within 5s: killing it" >&2
        fi
    fi
    kill -KILL -- "-$pid" 2>/dev/null || true # stragglers, if any
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    [[ -z $STOPPED ]] || return 0
    STOPPED=1
    stop_nginx
    if [[ ${KEEP:-} == 1 ]]; then
        echo "demo: kept the prefix $PREFIX (logs in $PREFIX/logs)" >&2
    else
        rm -rf "$PREFIX"
    fi
}
on_signal() {
    echo >&2
    cleanup
    exit 0
}
trap cleanup EXIT
trap on_signal INT TERM HUP

chmod 755 "$PREFIX" # workers run as `nobody` when nginx starts as root
mkdir -p "$PREFIX"/{conf,logs,state,tmp}
for f in "$SRC"/*.conf; do
    moved <"$f" >"$PREFIX/conf/$(basename "$f")"
done
ln -s "$REPO/lib" "$PREFIX/lib"
ln -s "$REPO/lua" "$PREFIX/lua"
# The first document's scripts were at ./ngx_lua/: the shims have their names.
ln -s "$REPO/lua" "$PREFIX/ngx_lua"

# Debian's nginx has the lua module as dynamic modules; OpenResty has it built in.
{
    echo "# generated by scripts/demo.sh"
    if ! "$NGINX" -V 2>&1 | grep -qi openresty; then
        for m in ndk_http_module.so ngx_http_lua_module.so; do
            [[ -f $MODULES_DIR/$m ]] && echo "load_module $MODULES_DIR/$m;"
        done
    fi
    echo "include nginx.conf;"
} >"$PREFIX/conf/top.conf"

if [[ ! -f $REPO/lua/dyups_api.lua ]]; then
    echo "demo: note: lua/dyups_api.lua is not there yet: 127.0.0.1:8081 will answer 404 until it is" >&2
fi

# --- run ---------------------------------------------------------------------------

# Its own session: Ctrl-C reaches only this script, which stops nginx
# gracefully (QUIT) and can kill the whole group if that hangs.
# In the foreground, unless the configuration says so itself (Tengine's
# example has `daemon off;`, and a second one is an error).
GLOBALS=(-g 'daemon off;')
if grep -qE '^[[:space:]]*daemon[[:space:]]' "$PREFIX/conf/nginx.conf"; then GLOBALS=(); fi
setsid "$NGINX" -p "$PREFIX/" -c conf/top.conf "${GLOBALS[@]}" </dev/null &
MASTER=$!

all_listening() {
    local p
    for p in "${PORTS[@]}"; do port_taken "$p" || return 1; done
}
ready=
for ((i = 0; i < 100; i++)); do
    kill -0 "$MASTER" 2>/dev/null || break
    if all_listening; then ready=1; break; fi
    sleep 0.1
done
if [[ -z $ready ]]; then
    echo "demo: nginx did not come up; the end of $PREFIX/logs/error.log (KEEP=1 keeps it):" >&2
    tail -n 20 "$PREFIX/logs/error.log" >&2 2>/dev/null || true
    exit 1
fi

# What to try: the first ```sh block of the example's README.
try_lines() {
    awk '/^```sh$/ && !done { on = 1; next } on && /^```$/ { on = 0; done = 1 } on { print "  " $0 }' "$1"
}

if [[ -n $EXAMPLE ]]; then
    cat <<EOF
ngx.dyups demo (examples/$EXAMPLE): nginx $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), master pid $MASTER, 2 workers
  prefix     $PREFIX
  config     $SRC/nginx.conf
  error log  $PREFIX/logs/error.log   (tail -f it in another terminal)
  listening  $(printf '127.0.0.1:%s ' "${PORTS[@]}")

Try, in another terminal:

$(try_lines "$SRC/README.md" | moved)

Press Ctrl-C to stop.
EOF
else
cat <<EOF | moved
ngx.dyups demo: nginx $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), master pid $MASTER, 2 workers
  prefix     $PREFIX
  config     $REPO/examples/nginx.conf, examples/upstream.conf
  error log  $PREFIX/logs/error.log   (tail -f it in another terminal)
  proxy      127.0.0.1:8080    admin (REST) 127.0.0.1:8081    backends 127.0.0.1:8088 8089 (backup) 8090

Try, in another terminal:

  # upstream local: 8088 and 8090 take turns, 8089 is the backup
  curl 127.0.0.1:8080/local
  curl "127.0.0.1:8080/ups?op=del&server=127.0.0.1:8088"
  curl "127.0.0.1:8080/ups?op=del&server=127.0.0.1:8090"
  curl 127.0.0.1:8080/ups/check
  curl 127.0.0.1:8080/local          # 8089, the backup
  curl "127.0.0.1:8080/ups?op=add&server=127.0.0.1:8088"
  curl 127.0.0.1:8080/local

  # a new upstream, reached by Host
  curl -d "server 127.0.0.1:8089;server 127.0.0.1:8088;" 127.0.0.1:8081/upstream/dyhost
  curl -H "host: dyhost" 127.0.0.1:8080
  curl 127.0.0.1:8081/list
  curl 127.0.0.1:8081/detail
  curl 127.0.0.1:8081/upstream/dyhost
  curl -i -X DELETE 127.0.0.1:8081/upstream/dyhost
  curl -i -H "host: dyhost" 127.0.0.1:8080   # 502 again

Press Ctrl-C to stop.
EOF
fi

set +e
wait "$MASTER"
rc=$?
set -e
# Only reached when nginx exited by itself (a signal runs on_signal instead).
MASTER=
echo "demo: nginx exited (status $rc); the end of its error log:" >&2
tail -n 20 "$PREFIX/logs/error.log" >&2 2>/dev/null || true
exit "$rc"
