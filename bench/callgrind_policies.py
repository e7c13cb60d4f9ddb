#!/usr/bin/env python3
"""bench/callgrind_policies.py: instructions per request of every balancing
method, ngx.dyups against nginx's native upstream, counted by callgrind.

    python3 bench/callgrind_policies.py [--requests 3000] [--warm 2000]
                                        [--methods rr,chash,...] [--keep]

Throughput on a shared 2-core machine moves by +-15 % from one run to the
next; instruction counts repeat within a few dozen. This runs section 5's two
proxies (bench/dyups_bench.py's configurations, plus a round robin upstream
`rr` in each) as one nginx process each (`master_process off; daemon off;`)
under `valgrind --tool=callgrind`, sends `--warm` requests per method over
one keep-alive connection (the JIT compiles, the keepalive pool fills), zeroes
the counters, sends `--requests` more with the keys section 5's wrk script
sends, and dumps, in a process of its own per method and proxy (what LuaJIT
compiles depends on what ran before). An idle dump as long as the measured one is subtracted (the
refresh timer, epoll). Printed per method and proxy: instructions per
request, split by the object that ran them (ngx.dyups' .so, lua-nginx-module
with LuaJIT and its JIT-compiled code, nginx, libc and the rest), and with
`--detail` the inclusive cost per request of the request path's entry
points. Every nginx it starts is stopped when it ends.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dyups_bench as db  # noqa: E402  (the configurations of section 5)

# Section 5's methods, round robin among them.
METHODS = list(db.POLICIES)

# Functions whose inclusive cost per request --detail prints, when they ran.
DETAIL = [
    "ngx_http_lua_balancer_handler",
    "ngx_http_lua_log_handler",
    "ngx_http_lua_ffi_balancer_set_current_peer",
    "ngx_http_lua_ffi_balancer_get_last_failure",
    "ngx_http_lua_ffi_balancer_set_more_tries",
    "ngx_http_lua_ffi_var_get",
    "ngx_http_get_variable",
    "ngx_parse_url",
    "dyups_pick",
    "dyups_done",
    "dyups_current",
    "ngx_http_upstream_get_round_robin_peer",
    "ngx_http_upstream_get_chash_peer",
    "ngx_http_upstream_get_hash_peer",
    "ngx_http_upstream_get_ip_hash_peer",
    "ngx_http_upstream_get_least_conn_peer",
    "ngx_http_upstream_get_random_peer",
    "ngx_http_upstream_get_random2_peer",
    "ngx_http_upstream_free_round_robin_peer",
    "ngx_http_upstream_free_keepalive_peer",
    "ngx_http_upstream_get_keepalive_peer",
    "ngx_http_complex_value",
    "ngx_http_realip_handler",
    "ngx_http_process_request",
]


# The floors, measured in the dyups proxy itself (section 5's FLOOR_ROWS, in
# its configuration, realip included): "floor" is section 1's minimal Lua
# balancer (bench_rr: a fixed round robin that only calls set_current_peer),
# the least any Lua balancer costs; "floor-log" adds a log_by_lua_file of an
# empty file, the least a hook of the README's form costs (least_conn and
# random two carry it).
FLOORS = [("floor", "", "none"), ("floor-log", "", "none")]
FLOOR_OF = {"lc": "floor-log", "random2": "floor-log", "lc-block": "floor-log"}
# Only with --methods: least_conn with the hook as a log_by_lua_block
# instead of the README's log_by_lua_file lua/log.lua; the floor with the
# README's hook (dyups.log() finds no connection to give back), with it as a
# block, and with an empty log_by_lua_block.
VARIANTS = [("lc-block", "", "none"), ("floor-hook", "", "none"), ("floor-hookblock", "", "none"),
            ("floor-logblock", "", "none")]


def floor_conf(body):
    """Section 5's dyups proxy (which holds the floors, dyups_bench.FLOOR_ROWS)
    with the variants' locations, and no refresh timer during the counts: its
    cost is per second, not per request (~20 looks a second of a few thousand
    instructions), and it would make the count depend on how fast the machine
    ran the requests."""
    body = body.replace('upstreams = "conf/upstream.conf" }',
                        'upstreams = "conf/upstream.conf", refresh = 3600 }', 1)
    locs = """        location = /floor-logblock { proxy_pass http://floor; log_by_lua_block { } }
        location = /lc-block { proxy_pass http://dy_lc; log_by_lua_block { require("ngx.dyups").log() } }
        location = /floor-hook { proxy_pass http://floor;""" + db.LOG_HOOK + """ }
        location = /floor-hookblock { proxy_pass http://floor; log_by_lua_block { require("ngx.dyups").log() } }
"""
    return body.replace("        location = /peers", locs + "        location = /peers", 1)


def proc_conf(body):
    """section 5's proxy configuration as one process in the foreground."""
    pre = db.preamble(1).replace("daemon on;", "daemon off;").replace(
        "master_process on;", "master_process off;")
    return pre + "http {\n" + db.HTTP_COMMON + body + "\n}\n"


class Proc:
    """One nginx process under callgrind."""

    def __init__(self, root, name, body, port, files=None):
        self.prefix = os.path.join(root, name)
        for d in ("conf", "logs", "tmp", "state"):
            os.makedirs(os.path.join(self.prefix, d), exist_ok=True)
        os.chmod(self.prefix, 0o755)
        self.conf = os.path.join(self.prefix, "conf", "nginx.conf")
        for rel, text in {**(files or {}), "conf/nginx.conf": proc_conf(body)}.items():
            path = os.path.join(self.prefix, rel)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o644)
        self.port = port
        self.out = os.path.join(self.prefix, "callgrind.out")
        self.p = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}",
             db.NGINX, "-p", self.prefix + "/", "-c", self.conf],
            stdin=subprocess.DEVNULL, stdout=open(os.path.join(self.prefix, "logs", "vg.log"), "w"),
            stderr=subprocess.STDOUT, env=db.NGINX_ENV)
        deadline = time.monotonic() + 120
        while not db.port_open(port):
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.prefix}/logs")
            time.sleep(0.2)

    def control(self, *args):
        subprocess.run(["callgrind_control", *args, str(self.p.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

    def dumps(self):
        return sorted((f for f in os.listdir(self.prefix) if f.startswith("callgrind.out.")),
                      key=lambda f: int(f.rsplit(".", 1)[1]))

    def dump(self):
        before = set(self.dumps())
        self.control("-d")
        deadline = time.monotonic() + 60
        while True:
            new = [f for f in self.dumps() if f not in before]
            if new:
                path = os.path.join(self.prefix, new[0])
                time.sleep(0.3)  # written by the time callgrind_control returns; be sure
                return path
            if time.monotonic() > deadline:
                raise RuntimeError("callgrind dump did not appear")
            time.sleep(0.1)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Client:
    """Sequential GETs over one keep-alive connection."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def get(self, path, headers):
        h = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{h}\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        n = int(m.group(1)) if m else 0
        while len(self.buf) < n:
            self.buf += self.s.recv(65536)
        body, self.buf = self.buf[:n], self.buf[n:]
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body!r}")

    def close(self):
        self.s.close()


def send(port, name, mode, n, start):
    c = Client(port)
    for j in range(start, start + n):
        q, h = db.policy_request(mode, j % db.POLICY_KEYS + 1)
        c.get(f"/{name}{q}", h)
    c.close()


# --- reading callgrind's output -----------------------------------------------

NAMED = re.compile(r"^(ob|fl|fi|fe|fn|cob|cfi|cfl|cfn)=(?:\((\d+)\))?\s*(.*)$")


def parse(path):
    """(total Ir, {object: self Ir}, {function: inclusive Ir}, {(object, function): self Ir})."""
    names = {}
    ob = fn = cob = cfn = None
    self_ob, self_fn, incl = {}, {}, {}
    total = 0
    in_call = False
    with open(path) as f:
        for line in f:
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if in_call:
                    if cfn is not None and cfn != fn:
                        incl[cfn] = incl.get(cfn, 0) + cost
                    in_call = False
                else:
                    self_ob[ob] = self_ob.get(ob, 0) + cost
                    self_fn[(ob, fn)] = self_fn.get((ob, fn), 0) + cost
                continue
            if line.startswith("calls="):
                in_call = True
                continue
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
                continue
            m = NAMED.match(line)
            if not m:
                continue
            kind, ident, name = m.groups()
            key = ("ob" if kind in ("ob", "cob") else "fl" if kind in ("fl", "fi", "fe", "cfi", "cfl")
                   else "fn", ident)
            if name:
                if ident:
                    names[key] = name
            else:
                name = names.get(key, "?")
            if kind == "ob":
                ob, cob = name, name
            elif kind == "cob":
                cob = name
            elif kind == "fn":
                fn = name
                cob = ob
            elif kind == "cfn":
                cfn = name
    # A function's inclusive cost is the sum of what its calls cost (each
    # call's line holds the callee's inclusive cost; calls into itself are
    # skipped above). Roots, never called, do not appear.
    return total, self_ob, incl, self_fn


def group(obj):
    base = os.path.basename(obj or "?")
    if "dyups" in base:
        return "ngx.dyups"
    if "lua_module" in base or "luajit" in base or base in ("???", "?"):
        return "lua-nginx-module+LuaJIT"
    if base == "nginx" or base.startswith("ngx_") or base.startswith("ndk_"):
        return "nginx"
    return "libc+other"


GROUPS = ["ngx.dyups", "lua-nginx-module+LuaJIT", "nginx", "libc+other"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--warm", type=int, default=2000)
    ap.add_argument("--methods", default=",".join(m for m, _, _ in METHODS))
    ap.add_argument("--proxies", default="native,dyups")
    ap.add_argument("--repeat", type=int, default=1,
                    help="processes per method and proxy; the median one is reported (LuaJIT's "
                         "trace choices vary between runs by up to ~200 instructions a request)")
    ap.add_argument("--detail", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the prefixes and dumps")
    cfg = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind not found: apt-get install -y valgrind")
    wanted = cfg.methods.split(",")
    root = tempfile.mkdtemp(prefix="ngx-dyups-cg.")
    os.chmod(root, 0o755)
    procs = []
    results = {}
    try:
        backends = [db.free_port() for _ in range(4)]
        be = db.Nginx(root, "backends", 1, db.backends_conf(backends), lua=False)
        be.start(backends)
        b2 = backends[:2]
        # A process of its own for each method: what LuaJIT compiles, and so
        # what a request costs, depends on which code ran before.
        runs = [(pname, m) for pname in cfg.proxies.split(",")
                for m in METHODS + (FLOORS + VARIANTS if pname == "dyups" else [])
                if m[0] in wanted or m in FLOORS]
        for rep, (pname, (name, _, mode)) in ((r, x) for r in range(cfg.repeat) for x in runs):
            port = db.free_port()
            if pname == "native":
                p = Proc(root, f"native-{name}-{rep}", db.policy_native_conf(port, b2), port)
            else:
                p = Proc(root, f"dyups-{name}-{rep}", floor_conf(db.policy_dyups_conf(port, b2)),
                         port, files={"conf/upstream.conf": db.policy_seed(b2), "conf/empty.lua": ""})
            procs.append(p)
            send(port, name, mode, cfg.warm, 0)
            p.control("-z")
            t0 = time.monotonic()
            send(port, name, mode, cfg.requests, cfg.warm)
            secs = time.monotonic() - t0
            busy = parse(p.dump())
            p.control("-z")
            time.sleep(secs)
            idle = parse(p.dump())
            p.stop()
            results.setdefault((name, pname), []).append((busy, idle, secs))
            per = (busy[0] - idle[0]) / cfg.requests
            print(f"{name:8s} {pname:7s} {per:8.0f} instr/request (idle {idle[0] / cfg.requests:.0f},"
                  f" {secs:.1f} s)", file=sys.stderr, flush=True)
    finally:
        for p in procs:
            p.stop()
        db.stop_all()
        if cfg.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    n = cfg.requests
    # The run with the median total, of each method and proxy.
    results = {k: sorted(v, key=lambda r: r[0][0] - r[1][0])[len(v) // 2] for k, v in results.items()}
    if cfg.repeat > 1:
        print(f"(median of {cfg.repeat} processes each)")
    print(f"callgrind, instructions per request ({n} requests after {cfg.warm} warm-up, one keep-alive "
          f"connection, idle dump of the same length subtracted)")
    print(f"{'method':8s} {'proxy':7s} {'total':>8s} " + " ".join(f"{g:>24s}" for g in GROUPS))
    for name, _, _ in METHODS + FLOORS:
        for pname in cfg.proxies.split(","):
            r = results.get((name, pname))
            if not r:
                continue
            (bt, bo, _, _), (it, io, _, _), _ = r
            by = dict.fromkeys(GROUPS, 0)
            for obj, c in bo.items():
                by[group(obj)] += c
            for obj, c in io.items():
                by[group(obj)] -= c
            print(f"{name:8s} {pname:7s} {(bt - it) / n:8.0f} "
                  + " ".join(f"{by[g] / n:24.0f}" for g in GROUPS))
    floors = {f: results.get((f, "dyups")) for f, _, _ in FLOORS}
    if all(floors.values()):
        total = {f: (r[0][0] - r[1][0]) / n for f, r in floors.items()}
        print(f"floors (dyups proxy): any Lua balancer {total['floor']:.0f}, with a log_by_lua_file of an "
              f"empty file {total['floor-log']:.0f}")
        rr = results.get(("rr", "native"))
        base = (rr[0][0] - rr[1][0]) / n if rr else float("nan")
        print(f"{'method':8s} {'native':>8s} {'dyups':>8s} {'d-n':>7s} {'lua':>6s} {'ours':>7s} {'.so':>6s}"
              "   (lua = the floor - native round robin: what any Lua balancer costs, with an empty"
              " log_by_lua_file for lc, random2 (the methods with the hook); ours = d-n - lua: what"
              " ngx.dyups costs beyond that and beyond native's own pick; .so = instructions in"
              " ngx.dyups' library)")
        for name, _, _ in METHODS + VARIANTS:
            d = results.get((name, "dyups"))
            nat = results.get((name.split("-")[0], "native"))
            if not d or not nat:
                continue
            dt = (d[0][0] - d[1][0]) / n
            nt = (nat[0][0] - nat[1][0]) / n
            lua = total[FLOOR_OF.get(name, "floor")] - base
            so = sum(c for o, c in d[0][1].items() if group(o) == "ngx.dyups") / n
            print(f"{name:8s} {nt:8.0f} {dt:8.0f} {dt - nt:7.0f} {lua:6.0f} {dt - nt - lua:7.0f} {so:6.0f}")
    if cfg.detail:
        for name, _, _ in METHODS + FLOORS:
            for pname in cfg.proxies.split(","):
                r = results.get((name, pname))
                if not r:
                    continue
                (_, _, bi, _), (_, _, ii, _), _ = r
                shown = []
                for fn in DETAIL:
                    hits = [k for k in bi if k == fn or k.startswith(fn + "'") or k.endswith("::" + fn)]
                    c = sum(bi[k] - ii.get(k, 0) for k in hits)
                    if c > 0:
                        shown.append(f"{fn} {c / n:.0f}")
                print(f"  {name} {pname}: " + ", ".join(shown))


if __name__ == "__main__":
    main()
