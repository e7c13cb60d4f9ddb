#!/usr/bin/env python3
"""bench/dyups_bench.py: the driver behind `make bench` (bench/run.sh).

Starts its own nginx instances on loopback (backends, and proxies using the
same nginx + lua module packages as the specs), drives load with wrk, and
measures ngx.dyups in seven sections:

  1. throughput/latency: native upstream round robin vs a minimal
     balancer_by_lua vs ngx.dyups, interleaved rounds, medians;
  2. propagation: time from an update's 200 until every worker routes by
     the new table (with traffic, and idle via /ups/check);
  3. churn: failed client requests while an upstream changes many times/s;
  4. scale: 1 .. 10,000 upstreams of 4 servers;
  5. policies: round robin, hash $arg_k consistent, hash $arg_k, ip_hash,
     least_conn, random and random two, each against nginx's native
     upstream with the same policy, keys varied by lua/keys.lua, interleaved
     rounds, medians, and each proxy worker's CPU time per request;
     for the keyless ones, each backend's share under load and
     dyups.peers() connection counts back to 0 after it;
  6. sync (bench/sync_bench.py): `dyups sync` on 3 hosts following a
     3-member etcd, a put until every worker routes by it, and tables up to
     100,000 upstreams in etcd.
  7. active health checks (checks_bench.py): 1,000 and 10,000 servers
     under `check interval=1000 type=http`, the CPU probing costs, probes/s
     against expected, lateness, a hot upstream's req/s with and without.

Python standard library only; raw sockets and time.monotonic() for timing.
Every nginx it starts is stopped on exit, error, SIGINT or SIGTERM (and
bench/run.sh's trap stops anything left under the temp root as well).
"""

import argparse
import json
import math
import os
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time

import sync_bench
import checks_bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
NGINX = os.environ.get("NGINX_BIN", "nginx")
# nginx reads $NGINX as sockets inherited from a binary upgrade (and then
# does not daemonize): never pass it down.
NGINX_ENV = {k: v for k, v in os.environ.items() if k != "NGINX"}
MODULES_DIR = os.environ.get("NGINX_MODULES_DIR", "/usr/lib/nginx/modules")
WRK = os.environ.get("WRK", "wrk")
LUAJIT = os.environ.get("LUAJIT", "luajit")

INSTANCES = []  # every started nginx, for stop_all()
CHILDREN = []  # background processes (wrk), for stop_all()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def now():
    return time.monotonic()


# ---------------------------------------------------------------------------
# nginx instances


USED_PORTS = set()


def free_port():
    """A loopback port nobody listens on, never the same twice in one run."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p not in USED_PORTS:
            USED_PORTS.add(p)
            return p


def preamble(workers, lua=True):
    lines = []
    if lua:
        for m in ("ndk_http_module.so", "ngx_http_lua_module.so"):
            p = os.path.join(MODULES_DIR, m)
            if os.path.exists(p):
                lines.append(f"load_module {p};")
    lines += [
        "daemon on;",
        "master_process on;",
        f"worker_processes {workers};",
        "pid logs/nginx.pid;",
        "error_log logs/error.log warn;",
        "worker_rlimit_nofile 8192;",
        "events { worker_connections 4096; }",
    ]
    return "\n".join(lines) + "\n"


HTTP_COMMON = """
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    keepalive_requests 1000000;
    client_body_buffer_size 1m;
    client_max_body_size 1m;
"""


# The main-context lines of every ngx.dyups proxy, as the README has them:
# durable writes msync in this thread pool, off the event loop.
DYUPS_MAIN = "thread_pool dyups threads=1;\n"


class Nginx:
    def __init__(self, root, name, workers, http_body, lua=True, files=None, main=""):
        self.prefix = os.path.join(root, name)
        self.name = name
        self.workers = workers
        # Not state/: ngx.dyups' init makes it and gives it to the workers'
        # user, as on a host where it does not exist yet. Made here as root,
        # the workers could not create the copy of the state file in it
        # (`<state>.copy`), and every write would skip writing it.
        for d in ("conf", "logs", "tmp"):
            os.makedirs(os.path.join(self.prefix, d), exist_ok=True)
        os.chmod(self.prefix, 0o755)
        for rel, text in (files or {}).items():
            with open(os.path.join(self.prefix, rel), "w") as f:
                f.write(text)
        conf = preamble(workers, lua) + main + "http {\n" + HTTP_COMMON + http_body + "\n}\n"
        self.conf = os.path.join(self.prefix, "conf", "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.master = None

    def start(self, ports, timeout=30):
        INSTANCES.append(self)
        # Not a pipe: the daemonized master keeps the start-up stdout/stderr.
        out = os.path.join(self.prefix, "logs", "startup.log")
        with open(out, "w") as f:
            rc = subprocess.run([NGINX, "-p", self.prefix + "/", "-c", self.conf],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                env=NGINX_ENV).returncode
        if rc != 0:
            with open(out) as f:
                msg = f.read().strip()
            raise RuntimeError(f"nginx {self.name} did not start: {msg}\n" + self.error_log_tail())
        deadline = now() + timeout
        while True:
            try:
                with open(os.path.join(self.prefix, "logs", "nginx.pid")) as f:
                    self.master = int(f.read().strip())
                if len(self.worker_pids()) == self.workers and all(port_open(p) for p in ports):
                    return self
            except (OSError, ValueError):
                pass
            if now() > deadline:
                raise RuntimeError(f"nginx {self.name} not serving after {timeout}s\n"
                                   + self.error_log_tail())
            time.sleep(0.02)

    def worker_pids(self):
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            fields = st[st.rindex(")") + 2:].split()
            if int(fields[1]) == self.master and fields[0] != "Z":
                pids.append(int(d))
        return sorted(pids)

    def error_log_tail(self, n=20):
        try:
            with open(os.path.join(self.prefix, "logs", "error.log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def count_errors(self):
        try:
            with open(os.path.join(self.prefix, "logs", "error.log")) as f:
                return sum(1 for line in f if "[error]" in line or "[crit]" in line
                           or "[alert]" in line or "[emerg]" in line)
        except OSError:
            return 0

    def stop(self):
        if self.master is None:
            try:
                with open(os.path.join(self.prefix, "logs", "nginx.pid")) as f:
                    self.master = int(f.read().strip())
            except (OSError, ValueError):
                return
        pids = [self.master] + self.worker_pids()
        try:
            os.kill(self.master, signal.SIGQUIT)
        except ProcessLookupError:
            pass
        deadline = now() + 3
        while now() < deadline and any(alive(p) for p in pids):
            time.sleep(0.02)
        for p in pids:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.master = None


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rindex(")") + 2] != "Z"
    except OSError:
        return False


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def stop_all():
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
            p.wait()
    while INSTANCES:
        INSTANCES.pop().stop()


def cpu_ns(pid):
    """CPU time (user + system) process `pid` has run, in ns: the scheduler's
    own count (/proc/PID/schedstat), else the 10 ms ticks of /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            ns = int(f.read().split()[0])
        if ns:
            return ns
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * 10**9 // os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """CPU seconds (user + system) a process has used, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------
# HTTP over raw sockets (probes) and http.client (admin API)


def raw_get(port, path, host="bench", timeout=2.0):
    """One GET over a new connection: (status, headers, body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    finally:
        s.close()
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_s, _, rest = rest.partition(b"\r\n")
            size = int(size_s, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, headers, body


class Api:
    """A keep-alive client of the REST admin interface over a raw socket.

    Each request (headers and body) goes out in one write: when the body
    arrives in a later TCP segment than the headers, handle_api answers 500
    ("lua entry thread aborted: runtime error: unknown reason"; see
    bench/README.md), which is what Python's http.client triggers."""

    def __init__(self, port):
        self.port = port
        self.s = None
        self.buf = b""

    def _connect(self):
        self.s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self):
        b = self.s.recv(65536)
        if not b:
            raise ConnectionError("closed")
        self.buf += b

    def _read_until(self, sep):
        while sep not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(sep, 1)
        return head

    def _read_n(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, method, path, body=None, host="bench"):
        if self.s is None:
            self._connect()
        data = (body or "").encode()
        req = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
               f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        self.s.sendall(req)

    def recv(self):
        """(status, body); the headers are left in self.headers."""
        head = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        h = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            h[k.strip().lower()] = v.strip()
        if h.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")
                    break
                out += self._read_n(size)
                self._read_n(2)
        else:
            out = self._read_n(int(h.get("content-length", "0")))
        self.headers = h
        if h.get("connection", "").lower() == "close":
            self.s.close()
            self.s = None
        return status, out

    def _once(self, method, path, body):
        self.send(method, path, body)
        return self.recv()

    def call(self, method, path, body=None):
        for attempt in (1, 2):
            try:
                if self.s is None:
                    self._connect()
                return self._once(method, path, body)
            except OSError:
                if self.s:
                    self.s.close()
                self.s = None
                if attempt == 2:
                    raise

    def timed(self, method, path, body=None):
        t0 = now()
        st, data = self.call(method, path, body)
        return st, data, now() - t0


# ---------------------------------------------------------------------------
# wrk


def parse_duration(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    if not m:
        return float("nan")
    v, u = float(m.group(1)), m.group(2)
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]  # -> ms


def parse_wrk(out):
    r = {"rps": float("nan"), "p50": float("nan"), "p99": float("nan"),
         "requests": 0, "non2xx": 0, "sockerr": 0, "raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[key] = parse_duration(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["sockerr"] = sum(int(x) for x in m.groups())
    return r


def wrk_cmd(port, path, secs, conns, threads, host=None):
    cmd = [WRK, "-t", str(threads), "-c", str(conns), "-d", f"{secs}s", "--latency"]
    if host:
        cmd += ["-H", f"Host: {host}"]
    return cmd + [f"http://127.0.0.1:{port}{path}"]


def wrk(port, path, secs, conns=32, threads=1, host=None):
    r = subprocess.run(wrk_cmd(port, path, secs, conns, threads, host),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed: {r.stderr.strip()}")
    return parse_wrk(r.stdout)


def wrk_bg(port, path, secs, conns=32, threads=1, host=None):
    p = subprocess.Popen(wrk_cmd(port, path, secs, conns, threads, host),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.append(p)
    return p


def wrk_finish(p):
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.strip()}")
    return parse_wrk(out)


# ---------------------------------------------------------------------------
# statistics


def writer_bg(api_port, rate, secs, names, backends, read=False):
    """Section 4's REST writer (lua/writer.lua) in the background; `read`:
    GET /list at the same rate instead."""
    others = names if len(names) <= 200 else random.sample(names, 200)
    p = subprocess.Popen([LUAJIT, os.path.join(BENCH, "lua", "writer.lua"), str(api_port), str(rate),
                          str(secs), ",".join(others), ",".join(map(str, backends))]
                         + (["read"] if read else []),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.append(p)
    return p


def writer_finish(p):
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"lua/writer.lua failed: {err.strip()}")
    f = out.split()
    return {f[i]: float(f[i + 1]) for i in range(0, len(f) - 1, 2)}


def write_cpu(api_port, workers, rate, secs, names, backends, read=False):
    """CPU a write costs, without traffic: `rate` writes/s for `secs`, and the
    CPU seconds the workers (all their threads: the msync runs in nginx's
    thread pool) and the writer used, per write (µs)."""
    def children_cpu():
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    before, mine = [cpu_s(w) for w in workers], children_cpu()
    p = writer_bg(api_port, rate, secs, names, backends, read=read)
    wr = writer_finish(p)  # waits for it: its CPU is then in RUSAGE_CHILDREN
    n = max(1.0, wr["ok"] + wr["failed"])
    return {"workers_us": (sum(cpu_s(w) for w in workers) - sum(before)) / n * 1e6,
            "writer_us": (children_cpu() - mine) / n * 1e6, "rate": wr["ok"] / wr["secs"]}


def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, math.ceil(p / 100.0 * len(xs)) - 1))  # nearest rank
    return xs[k]


# ---------------------------------------------------------------------------
# configurations


def lua_paths():
    return f"""
    lua_package_path "{BENCH}/lua/?.lua;{REPO}/lua/?.lua;/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;";
    lua_package_cpath "{REPO}/lib/?.so;;";
"""


def backends_conf(ports):
    listens = "\n".join(f"        listen 127.0.0.1:{p} reuseport backlog=4096;" for p in ports)
    return f"""
    server {{
{listens}
        location / {{ return 200 "$server_port\\n"; }}
    }}
"""


PROXY_SERVER = """
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_connect_timeout 1s;
        proxy_read_timeout 5s;
"""


def native_conf(port, backends):
    servers = "".join(f"        server 127.0.0.1:{b};\n" for b in backends)
    return lua_paths() + f"""
    upstream native {{
{servers}        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{PROXY_SERVER}
        location / {{ proxy_pass http://native; }}
    }}
"""


def minlua_conf(port, backends):
    return lua_paths() + f"""
    init_by_lua_block {{ require("bench_rr").init({{ {", ".join(map(str, backends))} }}) }}
    upstream minlua {{
        server 0.0.0.1;
        balancer_by_lua_file {BENCH}/lua/minimal_balancer.lua;
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{PROXY_SERVER}
        location / {{ proxy_pass http://minlua; }}
    }}
"""


def dyups_conf(port, api_port, size="1m", extra_init="", x_worker=True, named=False):
    """The README's pattern: map $proxy_host, balancer_by_lua_file lua/upstream.lua.
    No log-phase hook: round robin counts no connections, and the README puts
    `log_by_lua_file lua/log.lua` only where least_conn / random two upstreams
    are proxied to (lua-nginx-module's log phase costs ~1,700 instructions a
    request; bench/README.md, "Section 5 with every policy").

    x_worker: `add_header X-Worker $pid` (section 2 pins workers by it); off
    for section 1, whose other proxies do not pay for it (~700 instructions a
    request, 3 % of the proxy's user time). named: upstream `bench` balances
    with `balance("bench")` in a balancer_by_lua_block, which skips reading
    $dyups_upstream (the map)."""
    xw = "add_header X-Worker $pid always;" if x_worker else ""
    bench_bal = ('balancer_by_lua_block { require("ngx.dyups").balance("bench") }' if named
                 else f"balancer_by_lua_file {REPO}/lua/upstream.lua;")
    return lua_paths() + f"""
    map $proxy_host $dyups_upstream {{
        default        $proxy_host;
        dyups_by_host  $host;
    }}
    init_by_lua_block {{
        assert(require("ngx.dyups").init{{
            path = "state/dyups.state",
            upstreams = "conf/upstream.conf",
            size = "{size}",
            {extra_init}
        }})
    }}
    init_worker_by_lua_block {{
        local ok, err = require("ngx.dyups").init_worker()
        if not ok then ngx.log(ngx.ERR, "dyups init_worker: ", err) end
    }}
    upstream bench {{
        server 0.0.0.1;
        {bench_bal}
        keepalive 32;
    }}
    upstream u {{
        server 0.0.0.1;
        balancer_by_lua_file {REPO}/lua/upstream.lua;
        keepalive 32;
    }}
    upstream churn {{
        server 0.0.0.1;
        balancer_by_lua_file {REPO}/lua/upstream.lua;
        keepalive 32;
    }}
    upstream dyups_by_host {{
        server 0.0.0.1;
        balancer_by_lua_file {REPO}/lua/upstream.lua;
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
{PROXY_SERVER}
        {xw}
        location / {{ proxy_pass http://bench; }}
        location /u {{ proxy_pass http://u; }}
        location /churn {{ proxy_pass http://churn; }}
        location /host {{
            proxy_set_header Host $host;
            proxy_pass http://dyups_by_host;
        }}
        location = /ups {{ content_by_lua_file {REPO}/lua/upsops.lua; }}
        location = /ups/check {{ content_by_lua_file {REPO}/lua/srvcheck.lua; }}
    }}
    server {{
        listen 127.0.0.1:{api_port} reuseport;
        location / {{ content_by_lua_file {REPO}/lua/dyups_api.lua; }}
    }}
"""


def srv(b, extra=""):
    return f"server 127.0.0.1:{b}{extra};"


# ---------------------------------------------------------------------------
# section 1: throughput and latency


def section_throughput(cfg, root, backends, res):
    b2 = backends[:2]
    pn, pm, pd, papi = free_port(), free_port(), free_port(), free_port()
    pdn, papin = free_port(), free_port()
    seed = {"conf/upstream.conf": "upstream bench { %s %s }\n" % (srv(b2[0]), srv(b2[1]))}
    proxies = [
        ("native", Nginx(root, "p-native", 1, native_conf(pn, b2)), pn),
        ("minimal-lua", Nginx(root, "p-minlua", 1, minlua_conf(pm, b2)), pm),
        ("dyups", Nginx(root, "p-dyups", 1, dyups_conf(pd, papi, x_worker=False), files=seed,
                        main=DYUPS_MAIN), pd),
        # Informative: the same without the $dyups_upstream read (map + ngx.var).
        ("dyups-named", Nginx(root, "p-dyups-named", 1,
                              dyups_conf(pdn, papin, x_worker=False, named=True), files=seed,
                              main=DYUPS_MAIN), pdn),
    ]
    for _, inst, port in proxies:
        inst.start([port])
    for name, _, port in proxies:  # sanity + warm-up (JIT, keepalive pools)
        st, _, body = raw_get(port, "/")
        if st != 200:
            raise RuntimeError(f"{name} proxy answered {st}: {body!r}")
        wrk(port, "/", 1, cfg.conns, cfg.threads)
    runs = {n: [] for n, _, _ in proxies}
    for rnd in range(cfg.rounds):
        for name, _, port in proxies:
            r = wrk(port, "/", cfg.secs, cfg.conns, cfg.threads)
            runs[name].append(r)
            log(f"  [1] round {rnd + 1}/{cfg.rounds} {name:12s} {r['rps']:9.0f} req/s "
                f"p50 {r['p50']:.3f} ms p99 {r['p99']:.3f} ms")
    for _, inst, _ in proxies:
        inst.stop()
    out = {}
    for name in runs:
        rs = runs[name]
        out[name] = {
            "rps": med([r["rps"] for r in rs]),
            "p50": med([r["p50"] for r in rs]),
            "p99": med([r["p99"] for r in rs]),
            "errors": sum(r["non2xx"] + r["sockerr"] for r in rs),
            "rps_all": [r["rps"] for r in rs],
        }
    d, n, m = runs["dyups"], runs["native"], runs["minimal-lua"]
    out["ratio_native"] = out["dyups"]["rps"] / out["native"]["rps"]
    out["ratio_minlua"] = out["dyups"]["rps"] / out["minimal-lua"]["rps"]
    out["ratio_native_paired"] = med([a["rps"] / b["rps"] for a, b in zip(d, n)])
    out["ratio_minlua_paired"] = med([a["rps"] / b["rps"] for a, b in zip(d, m)])
    dn = runs["dyups-named"]
    out["ratio_named_minlua_paired"] = med([a["rps"] / b["rps"] for a, b in zip(dn, m)])
    out["ratio_named_dyups_paired"] = med([a["rps"] / b["rps"] for a, b in zip(dn, d)])
    res["throughput"] = out


# ---------------------------------------------------------------------------
# section 2: propagation


class Pinned:
    """One keep-alive connection to each worker of a proxy (reuseport spreads
    new connections; keep the first one that lands on each worker)."""

    def __init__(self, port, path, host, workers):
        self.path, self.host, self.conns, spare = path, host, {}, []
        for _ in range(400):
            if set(self.conns) >= workers:
                break
            c = Api(port)
            c.send("GET", path, None, host)
            c.recv()
            pid = int(c.headers.get("x-worker", "0"))
            if pid in workers and pid not in self.conns:
                self.conns[pid] = c
            else:
                spare.append(c)
        for c in spare:
            if c.s:
                c.s.close()
        if set(self.conns) < workers:
            raise RuntimeError("could not reach every worker over keep-alive connections")

    def until_all(self, marker, t0, limit=2.0):
        """Send one request to every worker that has not switched yet (in
        parallel), until all answer with `marker`: seconds since t0, rounds."""
        todo, rounds = set(self.conns), 0
        while todo:
            for pid in todo:
                self.conns[pid].send("GET", self.path, None, self.host)
            rounds += 1
            for pid in list(todo):
                st, body = self.conns[pid].recv()
                if st == 200 and body.split()[0].decode() == str(marker):
                    todo.discard(pid)
            if todo and now() - t0 > limit:
                return float("inf"), rounds
        return now() - t0, rounds


class Observer:
    """bench/pending_watch.lua in plain LuaJIT: reads the state file directly
    (no request reaches a worker) and answers when dyups.pending() is empty,
    i.e. every live worker has applied the current table."""

    def __init__(self, state_path, size):
        self.p = subprocess.Popen([os.environ.get("LUAJIT", "luajit"),
                                   os.path.join(BENCH, "pending_watch.lua"), REPO, state_path, size],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        CHILDREN.append(self.p)
        line = self.p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"pending_watch.lua: {line!r}")

    def wait_applied(self, limit=3.0):
        self.p.stdin.write(f"wait {limit}\n")
        self.p.stdin.flush()
        polls, secs = self.p.stdout.readline().split()
        return int(polls), float(secs)

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def check_empty(port):
    st, _, body = raw_get(port, "/ups/check")
    if st != 200:
        raise RuntimeError(f"/ups/check answered {st}: {body!r}")
    return json.loads(body).get("data") in ({}, [])


def propagation_traffic(api, pinned, name, backends, n, tag):
    times, rounds = [], 0
    k = 0
    for i in range(n):
        k = (k + 1) % len(backends)
        b = backends[k]
        st, body = api.call("POST", f"/upstream/{name}", srv(b))
        t0 = now()
        if st != 200:
            raise RuntimeError(f"update {i} answered {st}: {body!r}")
        t, r = pinned.until_all(b, t0)
        times.append(t)
        rounds += r
        time.sleep(random.uniform(0.002, 0.01))
    log(f"  [{tag}] {n} updates: p50 {pct(times, 50) * 1e3:.2f} ms p99 "
        f"{pct(times, 99) * 1e3:.2f} ms max {max(times) * 1e3:.2f} ms")
    return {"n": n, "times": times, "rounds": rounds}


def probe_rtt(pinned, n=200):
    ts = []
    for _ in range(n):
        t0 = now()
        for c in pinned.conns.values():
            c.send("GET", pinned.path, None, pinned.host)
        for c in pinned.conns.values():
            c.recv()
        ts.append(now() - t0)
    return ts


def section_propagation(cfg, root, backends, res):
    port, api_port = free_port(), free_port()
    files = {"conf/upstream.conf": "upstream u { %s }\nupstream bench { %s %s }\n"
             % (srv(backends[0]), srv(backends[0]), srv(backends[1]))}
    inst = Nginx(root, "p-prop", 2, dyups_conf(port, api_port), files=files,
                 main=DYUPS_MAIN).start([port, api_port])
    workers = set(inst.worker_pids())
    api = Api(api_port)
    out = {}
    # with traffic: a wrk load on the same proxy (another upstream), and the
    # probes on one keep-alive connection per worker
    load = wrk_bg(port, "/", 3600, conns=cfg.bg_conns, threads=1)
    time.sleep(0.3)
    pinned = Pinned(port, "/u", "bench", workers)
    rtt = probe_rtt(pinned)
    out["probe_rtt"] = {"p50": pct(rtt, 50), "p99": pct(rtt, 99)}
    out["traffic"] = propagation_traffic(api, pinned, "u", backends, cfg.prop_n, "2 traffic")
    load.kill()
    load.wait()
    for c in pinned.conns.values():
        c.s.close()
    # idle: no request reaches a worker; a LuaJIT process reads the state file
    # until dyups.pending() is empty (what /ups/check answers)
    obs = Observer(os.path.join(inst.prefix, "state", "dyups.state"), "1m")
    time.sleep(0.2)
    times = []
    k = 0
    for i in range(cfg.prop_n):
        k = (k + 1) % len(backends)
        st, body = api.call("POST", "/upstream/u", srv(backends[k]))
        t0 = now()
        if st != 200:
            raise RuntimeError(f"update {i} answered {st}: {body!r}")
        obs.wait_applied()
        times.append(now() - t0)
        time.sleep(random.uniform(0.0, 0.06))  # random phase w.r.t. the refresh timers
    obs.close()
    log(f"  [2 idle] {cfg.prop_n} updates: p50 {pct(times, 50) * 1e3:.1f} ms p99 "
        f"{pct(times, 99) * 1e3:.1f} ms max {max(times) * 1e3:.1f} ms")
    out["idle"] = {"n": cfg.prop_n, "times": times}
    # /ups/check, as the brief suggested: every poll refreshes the worker it
    # lands on, so this is "idle but polled", shown for comparison
    times = []
    for i in range(min(cfg.prop_n, 50)):
        k = (k + 1) % len(backends)
        api.call("POST", "/upstream/u", srv(backends[k]))
        t0 = now()
        while not check_empty(port) and now() - t0 < 3:
            time.sleep(0.002)
        times.append(now() - t0)
        time.sleep(random.uniform(0.0, 0.06))
    out["check"] = {"n": len(times), "times": times}
    out["errors_in_log"] = inst.count_errors()
    inst.stop()
    res["propagation"] = out


# ---------------------------------------------------------------------------
# section 3: churn


def churn_ops(name, b):
    """A cycle of changes among alive backends: replace, add, remove."""
    a = [f"127.0.0.1:{p}" for p in b]
    return [
        ("POST", f"/upstream/{name}", f"server {a[0]}; server {a[1]};"),
        ("POST", f"/upstream/{name}/servers", a[2]),
        ("DELETE", f"/upstream/{name}/servers/{a[0]}", None),
        ("POST", f"/upstream/{name}", f"server {a[2]}; server {a[3]} weight=2;"),
        ("POST", f"/upstream/{name}/servers", f"{a[1]} weight=3"),
        ("DELETE", f"/upstream/{name}/servers/{a[3]}", None),
        ("POST", f"/upstream/{name}", f"server {a[0]}; server {a[1]}; server {a[2]}; server {a[3]};"),
    ]


def section_churn(cfg, root, backends, res):
    port, api_port = free_port(), free_port()
    files = {"conf/upstream.conf": "upstream churn { %s %s %s %s }\n" % tuple(srv(b) for b in backends[:4])}
    inst = Nginx(root, "p-churn", 2, dyups_conf(port, api_port), files=files,
                 main=DYUPS_MAIN).start([port, api_port])
    api = Api(api_port)
    raw_get(port, "/churn")
    ops = churn_ops("churn", backends[:4])
    p = wrk_bg(port, "/churn", cfg.churn_secs, conns=cfg.conns, threads=cfg.threads)
    t0 = now()
    ok = bad = 0
    lat = []
    i = 0
    while p.poll() is None:
        m, path, body = ops[i % len(ops)]
        st, data, dt = api.timed(m, path, body)
        lat.append(dt)
        if 200 <= st < 300:
            ok += 1
        else:
            bad += 1
            if bad <= 3:
                log(f"  [3] update {m} {path} -> {st} {data!r}")
        i += 1
    el = now() - t0
    r = wrk_finish(p)
    out = {"updates_ok": ok, "updates_failed": bad, "rate": ok / el, "secs": el,
           "requests": r["requests"], "rps": r["rps"], "non2xx": r["non2xx"],
           "sockerr": r["sockerr"], "update_p50": pct(lat, 50), "update_p99": pct(lat, 99),
           "errors_in_log": inst.count_errors()}
    log(f"  [3] {ok} updates in {el:.1f} s ({out['rate']:.0f}/s), {r['requests']} requests, "
        f"non-2xx {r['non2xx']}, socket errors {r['sockerr']}, error-log lines {out['errors_in_log']}")
    if out["errors_in_log"]:
        log(inst.error_log_tail(5))
    inst.stop()
    res["churn"] = out


# ---------------------------------------------------------------------------
# section 4: scale


def section_scale(cfg, root, backends, res):
    b4 = backends[:4]
    four = " ".join(srv(b) for b in b4)
    out = []
    for n in cfg.scale:
        port, api_port = free_port(), free_port()
        text = "".join(f"upstream u{i} {{ {four} }}\n" for i in range(n))
        inst = Nginx(root, f"p-scale-{n}", 2, dyups_conf(port, api_port, size=cfg.scale_size,
                                                         extra_init=cfg.scale_init),
                     files={"conf/upstream.conf": text}, main=DYUPS_MAIN)
        t0 = now()
        inst.start([port, api_port], timeout=120)
        start_s = now() - t0
        workers = set(inst.worker_pids())
        api = Api(api_port)
        others = [f"u{i}" for i in range(1, n)] or ["c1"]  # N=1: churn a second upstream
        st, _, _ = raw_get(port, "/host", "u0")
        if st != 200:
            raise RuntimeError(f"scale {n}: u0 answered {st}")
        # one update: client-side latency of a REST POST (whole upstream replaced)
        lat = []
        for i in range(cfg.scale_updates):
            random.shuffle(b4)
            st, body, dt = api.timed("POST", f"/upstream/{random.choice(others)}",
                                     " ".join(srv(b) for b in b4))
            if st != 200:
                raise RuntimeError(f"scale {n}: update answered {st}: {body!r}")
            lat.append(dt)
        # time until every worker routes by it (probes are the traffic)
        pinned = Pinned(port, "/host", "u0", workers)
        prop = propagation_traffic(api, pinned, "u0", b4, cfg.scale_updates, f"4 N={n}")
        for c in pinned.conns.values():
            c.s.close()
        api.call("POST", "/upstream/u0", four)
        raw_get(port, "/host", "u0")
        # throughput on unchanged u0, quiet vs while the others churn at a
        # steady rate (cfg.scale_rate, then cfg.scale_fast_rate), interleaved
        quiet = []
        # For N = 1 also the same rate of reads (GET /list): what the admin
        # requests cost without writing.
        kinds = [(cfg.scale_rate, False), (cfg.scale_fast_rate, False)]
        kinds += [(cfg.scale_fast_rate, True)] if n == 1 else []
        churns = {k: {"runs": [], "rates": [], "p50": [], "p99": [], "failed": 0} for k in kinds}
        for rnd in range(cfg.scale_rounds):
            quiet.append(wrk(port, "/host", cfg.scale_secs, cfg.conns, cfg.threads, host="u0"))
            for (rate, read), c in churns.items():
                # a steady `rate` updates/s on other upstreams, from a LuaJIT
                # client (lua/writer.lua) as long as wrk runs
                p = wrk_bg(port, "/host", cfg.scale_secs, cfg.conns, cfg.threads, host="u0")
                w = writer_bg(api_port, rate, cfg.scale_secs, others, b4, read=read)
                c["runs"].append(wrk_finish(p))
                wr = writer_finish(w)
                c["rates"].append(wr["ok"] / wr["secs"])
                c["failed"] += wr["failed"]
                c["p50"].append(wr["p50"])
                c["p99"].append(wr["p99"])
        # what a write costs, without traffic (and, for N = 1, a read)
        cost = write_cpu(api_port, workers, cfg.scale_fast_rate, cfg.scale_secs, others, b4)
        if n == 1:
            cost["read"] = write_cpu(api_port, workers, cfg.scale_fast_rate, cfg.scale_secs, others, b4,
                                     read=True)
        sf = os.stat(os.path.join(inst.prefix, "state", "dyups.state"))
        rss = max(rss_kb(w) for w in workers)
        q = med([r["rps"] for r in quiet])
        slow, fast = churns[(cfg.scale_rate, False)], churns[(cfg.scale_fast_rate, False)]
        reads = churns.get((cfg.scale_fast_rate, True))
        b = med([r["rps"] for r in slow["runs"]])
        row = {"n": n, "start_s": start_s, "file_bytes": sf.st_size,
               "seed_bytes": len(text), "rss_kb": rss,
               "update_p50": pct(lat, 50), "update_p99": pct(lat, 99),
               "prop_p50": pct(prop["times"], 50), "prop_p99": pct(prop["times"], 99),
               "prop_max": max(prop["times"]), "rps_quiet": q, "rps_churn": b,
               "churn_ratio": b / q, "churn_rate": med(slow["rates"]),
               "rps_quiet_all": [r["rps"] for r in quiet],
               "p99_quiet": med([r["p99"] for r in quiet]),
               "fast": {"rps": med([r["rps"] for r in fast["runs"]]),
                        "p99": med([r["p99"] for r in fast["runs"]]),
                        "rps_all": [r["rps"] for r in fast["runs"]],
                        # paired: each busy run against the quiet run of its round
                        "ratio_paired": med([f["rps"] / qq["rps"] for f, qq in zip(fast["runs"], quiet)]),
                        "rate": med(fast["rates"]), "update_p50": med(fast["p50"]),
                        "update_p99": med(fast["p99"]), "failed": fast["failed"]},
               "errors": sum(r["non2xx"] + r["sockerr"] for r in quiet + slow["runs"] + fast["runs"])
               + slow["failed"] + fast["failed"]}
        row["fast"]["ratio"] = row["fast"]["rps"] / q
        row["cost"] = cost
        if reads:
            row["reads"] = {"rps": med([r["rps"] for r in reads["runs"]]),
                            "ratio_paired": med([r["rps"] / qq["rps"] for r, qq in zip(reads["runs"], quiet)]),
                            "rate": med(reads["rates"])}
        log(f"  [4] N={n}: file {sf.st_size >> 10} KiB, "
            f"RSS {rss} kB, update p50 {row['update_p50'] * 1e3:.2f} ms, visible p99 "
            f"{row['prop_p99'] * 1e3:.2f} ms, {q:.0f} req/s quiet, {b:.0f} req/s with "
            f"{row['churn_rate']:.0f} updates/s on others, {row['fast']['rps']:.0f} req/s with "
            f"{row['fast']['rate']:.0f} updates/s (paired ratio {row['fast']['ratio_paired']:.3f})")
        inst.stop()
        out.append(row)
    res["scale"] = out


# ---------------------------------------------------------------------------
# section 5: policies (every balancing method) against nginx's own

POLICIES = [  # (location / dyups name, policy line, wrk script mode)
    # Round robin (no balancing line): the reference row, section 1's
    # comparison in this section's configuration.
    ("rr", "", "none"),
    ("chash", "hash $arg_k consistent;", "k"),
    ("hash", "hash $arg_k;", "k"),
    ("iphash", "ip_hash;", "ip"),
    ("lc", "least_conn;", "none"),
    ("random", "random;", "none"),
    ("random2", "random two;", "none"),
]
# Native upstreams that get a `zone`: ngx.dyups counts least_conn / random
# two connections (and every method's failures) for all workers at once, as
# nginx does only with a zone. The hash rows keep the configuration of the
# first section 5 runs (no zone), so their figures stay comparable.
NATIVE_ZONE = ("lc", "random", "random2")
# The methods that count connections, whose locations carry the log hook.
COUNTS_CONNS = ("lc", "random2")
LOG_HOOK = f" log_by_lua_file {REPO}/lua/log.lua;"
KEYLESS = tuple(name for name, _, mode in POLICIES if mode == "none")
# Rows timed like the methods, for reference, in the dyups proxy against
# native round robin: what any Lua balancer costs (section 1's minimal one,
# bench_rr: a fixed round robin that only calls set_current_peer), and with
# it a log_by_lua_file of an empty file (the README's hook form, doing
# nothing). What lua-nginx-module costs whatever the balancer does.
FLOOR_ROWS = [  # (dyups location, label)
    ("floor", "floor: any Lua balancer"),
    ("floor-log", "floor + log_by_lua_file"),
]


def policy_label(line):
    """A policy line as the report names it."""
    return line.rstrip(";") or "round robin"
POLICY_KEYS = 10000  # distinct keys (or client /24s) wrk cycles through
REALIP = """
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Real-IP;
"""


def policy_native_conf(port, backends):
    servers = "".join(f"        server 127.0.0.1:{b};\n" for b in backends)
    ups = "".join(f"""
    upstream native_{name} {{
        {line}
{f"        zone native_{name} 64k;{chr(10)}" if name in NATIVE_ZONE else ""}{servers}        keepalive 32;
    }}""" for name, line, _ in POLICIES)
    locs = "".join(f"        location = /{name} {{ proxy_pass http://native_{name}; }}\n"
                   for name, _, _ in POLICIES)
    return lua_paths() + REALIP + ups + f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{PROXY_SERVER}
{locs}    }}
"""


def policy_dyups_conf(port, backends):
    """The same upstreams in ngx.dyups (seeded from conf/upstream.conf), each
    nginx upstream block calling balance("NAME") as spec/policy_spec.lua does;
    the README's log-phase hook in the locations of least_conn and random two
    (they give their connection back there; the other methods count none and
    skip its cost), and GET /peers?u=NAME (bench/lua/peers.lua)."""
    ups = "".join(f"""
    upstream dy_{name} {{
        server 0.0.0.1;
        balancer_by_lua_block {{ require("ngx.dyups").balance("{name}") }}
        keepalive 32;
    }}""" for name, _, _ in POLICIES)
    locs = "".join(f"        location = /{name} {{ proxy_pass http://dy_{name};"
                   f"{LOG_HOOK if name in COUNTS_CONNS else ''} }}\n"
                   for name, _, _ in POLICIES)
    # The floors (FLOOR_ROWS): bench_rr over the same backends; the empty
    # file is conf/empty.lua in the prefix.
    floors = """        location = /floor { proxy_pass http://floor; }
        location = /floor-log { proxy_pass http://floor; log_by_lua_file conf/empty.lua; }
"""
    return lua_paths() + REALIP + f"""
    init_by_lua_block {{
        assert(require("ngx.dyups").init{{ path = "state/dyups.state", upstreams = "conf/upstream.conf" }})
        require("bench_rr").init({{ {", ".join(map(str, backends))} }})
    }}
    init_worker_by_lua_block {{
        local ok, err = require("ngx.dyups").init_worker()
        if not ok then ngx.log(ngx.ERR, "dyups init_worker: ", err) end
    }}
    upstream floor {{
        server 0.0.0.1;
        balancer_by_lua_block {{ require("bench_rr").balance() }}
        keepalive 32;
    }}
""" + ups + f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{PROXY_SERVER}
{locs}{floors}        location = /peers {{ content_by_lua_file {BENCH}/lua/peers.lua; }}
    }}
"""


def policy_seed(backends):
    servers = " ".join(srv(b) for b in backends)
    return "".join(f"upstream {name} {{ {line} {servers} }}\n" for name, line, _ in POLICIES)


def policy_request(mode, j):
    """(query, headers) of key j, as bench/lua/keys.lua builds it."""
    if mode == "ip":
        return "", {"X-Real-IP": f"10.{(j // 256) % 256}.{j % 256}.{j % 250 + 1}"}
    if mode == "none":
        return "", {}
    return f"?k={j}", {}


def backend_of(port, path, headers):
    """The backend port that one GET reaches (the backends answer their port)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        h = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{h}Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    finally:
        s.close()
    status = int(data.split(b" ", 2)[1])
    body = data.partition(b"\r\n\r\n")[2]
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {body!r}")
    return int(body.split()[0])


def peer_conns(port, name):
    """dyups.peers(name) through the proxy's /peers: [(server, conns, fails)]."""
    st, _, body = raw_get(port, f"/peers?u={name}")
    if st != 200:
        raise RuntimeError(f"/peers?u={name} answered {st}: {body!r}")
    out = []
    for line in body.decode().splitlines():
        addr, conns, fails, _ = line.split()
        out.append((addr, int(conns), int(fails)))
    return out


def wrk_keys_cmd(port, path, secs, mode, conns, threads, count=False):
    return ([WRK, "-t", str(threads), "-c", str(conns), "-d", f"{secs}s", "--latency",
             "-s", os.path.join(BENCH, "lua", "keys.lua"),
             f"http://127.0.0.1:{port}{path}", "--", mode, str(POLICY_KEYS)]
            + (["count"] if count else []))


def wrk_keys(port, path, secs, mode, conns, threads):
    r = subprocess.run(wrk_keys_cmd(port, path, secs, mode, conns, threads),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed: {r.stderr.strip()}")
    return parse_wrk(r.stdout)


def share_run(port, name, cfg, peers_port=None):
    """One untimed wrk run (keys.lua counting the answers per backend) on a
    keyless policy; for the dyups proxy, dyups.peers() sampled meanwhile.
    Returns (wrk result with "backends": {port: n}, [conns in flight per sample])."""
    p = subprocess.Popen(wrk_keys_cmd(port, f"/{name}", cfg.pol_share_secs, "none",
                                      cfg.conns, cfg.threads, count=True),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.append(p)
    samples = []
    time.sleep(0.2)
    while peers_port and p.poll() is None:
        samples.append(sum(c for _, c, _ in peer_conns(peers_port, name)))
        time.sleep(0.05)
    r = wrk_finish(p)
    r["backends"] = {int(m.group(1)) if m.group(1).isdigit() else m.group(1): int(m.group(2))
                     for m in re.finditer(r"^backend (\S+) (\d+)$", r["raw"], re.M)}
    return r, samples


def conns_settled(port, name, limit=3.0):
    """dyups.peers(name)'s conns once they stop being > 0 (or after `limit`
    s): (conns per server, seconds waited)."""
    t0 = now()
    while True:
        conns = [c for _, c, _ in peer_conns(port, name)]
        if not any(conns) or now() - t0 > limit:
            return conns, now() - t0
        time.sleep(0.01)


def section_policies(cfg, root, backends, res):
    b2 = backends[:2]
    pn, pd = free_port(), free_port()
    proxies = [
        ("native", Nginx(root, "p-pol-native", 1, policy_native_conf(pn, b2)), pn),
        ("dyups", Nginx(root, "p-pol-dyups", 1, policy_dyups_conf(pd, b2),
                        files={"conf/upstream.conf": policy_seed(b2), "conf/empty.lua": ""},
                        main=DYUPS_MAIN), pd),
    ]
    for _, inst, port in proxies:
        inst.start([port])
    # The one worker of each proxy, whose CPU time per request is measured.
    worker = {pname: inst.worker_pids()[0] for pname, inst, _ in proxies}
    out = {}
    # Sanity: both proxies send the same keys to the same backend, and the
    # keys spread over both backends (wrk varies the key as these do). The
    # keyless methods have nothing to compare: both backends must answer
    # through each proxy (the share under load is checked after the rounds).
    for name, _, mode in POLICIES:
        agree, seen = 0, {"native": set(), "dyups": set()}
        for j in range(1, cfg.pol_check + 1):
            q, h = policy_request(mode, j * 97)
            a = backend_of(pn, f"/{name}{q}", h)
            b = backend_of(pd, f"/{name}{q}", h)
            agree += a == b
            seen["native"].add(a)
            seen["dyups"].add(b)
        used = min(len(x) for x in seen.values())
        out[name] = {"agree": None if mode == "none" else agree, "checked": cfg.pol_check,
                     "backends_seen": used}
        if (mode != "none" and agree != cfg.pol_check) or used < 2:
            log(f"  [5] {name}: {agree}/{cfg.pol_check} requests routed alike, {used} backend(s) seen")
    # What each row times: (row, path on native, path on dyups, wrk mode).
    rows = ([(name, f"/{name}", f"/{name}", mode) for name, _, mode in POLICIES]
            + [(name, "/rr", f"/{name}", "none") for name, _ in FLOOR_ROWS])
    for name, npath, dpath, mode in rows:  # warm-up (JIT, keepalive pools)
        for pname, _, port in proxies:
            wrk_keys(port, npath if pname == "native" else dpath, cfg.pol_warm, mode, cfg.conns,
                     cfg.threads)
    runs = {(row[0], p): [] for row in rows for p, _, _ in proxies}
    for rnd in range(cfg.pol_rounds):
        for name, npath, dpath, mode in rows:
            # alternate which proxy goes first, so neither always follows the other
            order = proxies if rnd % 2 == 0 else proxies[::-1]
            for pname, _, port in order:
                cpu0, t0 = cpu_ns(worker[pname]), now()
                r = wrk_keys(port, npath if pname == "native" else dpath, cfg.pol_secs, mode,
                             cfg.conns, cfg.threads)
                cpu, wall = cpu_ns(worker[pname]) - cpu0, now() - t0
                # The worker's CPU time over the requests it served (wrk's
                # count; the few it cut off at the end are not in it), and
                # how busy it was: near 100 % the proxy is the bottleneck.
                r["cpu_us"] = cpu / 1e3 / r["requests"] if r["requests"] else float("nan")
                r["busy"] = cpu / 1e9 / wall
                runs[(name, pname)].append(r)
                log(f"  [5] round {rnd + 1}/{cfg.pol_rounds} {name:7s} {pname:7s} {r['rps']:9.0f} req/s "
                    f"p50 {r['p50']:.3f} ms p99 {r['p99']:.3f} ms, worker {r['cpu_us']:.2f} us/req "
                    f"({r['busy'] * 100:.0f} % busy)")
    # The keyless methods: connections given back after all the timed load,
    # then a counted run per proxy (share of each backend under load, and
    # dyups.peers() sampled while it runs), and the connections again.
    for name in KEYLESS:
        o = out[name]
        o["conns_after_rounds"], _ = conns_settled(pd, name)
        o["share"], o["share_errors"] = {}, 0
        for pname, _, port in proxies:
            r, samples = share_run(port, name, cfg, pd if pname == "dyups" else None)
            total = sum(r["backends"].values()) or 1
            o["share"][pname] = [r["backends"].get(b, 0) / total for b in b2]
            o["share_errors"] += r["non2xx"] + r["sockerr"] + sum(
                v for k, v in r["backends"].items() if k not in b2)
            if pname == "dyups":
                o["conns_samples"] = samples
        o["conns_after"], o["settle_s"] = conns_settled(pd, name)
        log(f"  [5] {name}: share " + ", ".join(
            f"{pname} {'/'.join(f'{x * 100:.0f}' for x in o['share'][pname])} %" for pname in o["share"])
            + f"; dyups conns during load max {max(o['conns_samples'], default=0)}"
            f" ({len(o['conns_samples'])} samples), after {o['conns_after']}"
            f" (after the rounds {o['conns_after_rounds']})")
        if any(not 0.3 <= x <= 0.7 for sh in o["share"].values() for x in sh) or any(o["conns_after"]):
            log(f"  [5] {name}: CHECK FAILED (a backend's share outside 30-70 %, or conns not back to 0)")
    errors_in_log = {pname: inst.count_errors() for pname, inst, _ in proxies}
    for pname, inst, _ in proxies:
        if errors_in_log[pname]:
            log(inst.error_log_tail(5))
    for _, inst, _ in proxies:
        inst.stop()
    for name, line in [(n, line) for n, line, _ in POLICIES] + FLOOR_ROWS:
        o = out.setdefault(name, {})
        o["policy"] = line
        for pname, _, _ in proxies:
            rs = runs[(name, pname)]
            o[pname] = {"rps": med([r["rps"] for r in rs]), "p50": med([r["p50"] for r in rs]),
                        "p99": med([r["p99"] for r in rs]),
                        "errors": sum(r["non2xx"] + r["sockerr"] for r in rs),
                        "rps_all": [r["rps"] for r in rs],
                        "cpu_us": med([r["cpu_us"] for r in rs]),
                        "busy": med([r["busy"] for r in rs])}
        d, n = runs[(name, "dyups")], runs[(name, "native")]
        o["ratio"] = o["dyups"]["rps"] / o["native"]["rps"]
        o["ratio_paired"] = med([a["rps"] / b["rps"] for a, b in zip(d, n)])
        o["cpu_ratio_paired"] = med([a["cpu_us"] / b["cpu_us"] for a, b in zip(d, n)])
    out["errors_in_log"] = errors_in_log
    res["policies"] = out


# ---------------------------------------------------------------------------
# report


def fmt_ms(s):
    return f"{s * 1e3:.2f}" if s == s and s != float("inf") else "timeout"


def report(cfg, res, elapsed):
    p = print
    p()
    p(f"ngx.dyups benchmark — {time.strftime('%Y-%m-%d %H:%M:%S %Z')} — mode "
      f"{'QUICK' if cfg.quick else 'FULL'} — {os.cpu_count()} CPUs — took {elapsed:.0f} s")
    p(f"nginx: {subprocess.run([NGINX, '-v'], capture_output=True, text=True).stderr.strip()}; "
      f"wrk -t {cfg.threads} -c {cfg.conns} --latency; keepalive 32 to the backends")
    tp = res.get("throughput")
    if tp:
        p()
        p(f"1. Throughput and latency: 1 proxy worker each, same 2 backends (own nginx, 1 worker), "
          f"{cfg.rounds} interleaved rounds x {cfg.secs} s, medians")
        p(f"   {'proxy':14s} {'req/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}   req/s per round")
        for name in ("native", "minimal-lua", "dyups", "dyups-named"):
            r = tp[name]
            p(f"   {name:14s} {r['rps']:10.0f} {r['p50']:8.3f} {r['p99']:8.3f} {r['errors']:7d}   "
              + " ".join(f"{x:.0f}" for x in r["rps_all"]))
        p(f"   dyups/native      {tp['ratio_native']:.3f} (ratio of medians), "
          f"{tp['ratio_native_paired']:.3f} (median of per-round ratios)")
        p(f"   dyups/minimal-lua {tp['ratio_minlua']:.3f} (ratio of medians), "
          f"{tp['ratio_minlua_paired']:.3f} (median of per-round ratios)")
        p(f"   dyups-named (balance(\"bench\"), no $dyups_upstream read): "
          f"{tp['ratio_named_minlua_paired']:.3f} x minimal-lua, "
          f"{tp['ratio_named_dyups_paired']:.3f} x dyups (medians of per-round ratios)")
    pr = res.get("propagation")
    if pr:
        p()
        p("2. Propagation: from the update's 200 until every worker (2) routes by the new table")
        p(f"   {'':34s} {'n':>4s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
        for key, label in (("traffic", f"with traffic (wrk -c {cfg.bg_conns} + probes)"),
                           ("idle", "idle (state file until pending={})"),
                           ("check", "polling /ups/check until {}")):
            t = pr[key]["times"]
            p(f"   {label:34s} {len(t):4d} {fmt_ms(pct(t, 50)):>8s} {fmt_ms(pct(t, 99)):>8s} "
              f"{fmt_ms(max(t)):>8s}")
        p(f"   one probe round (a keep-alive GET to each worker, in parallel) under that load: p50 "
          f"{fmt_ms(pr['probe_rtt']['p50'])} ms, p99 {fmt_ms(pr['probe_rtt']['p99'])} ms; "
          f"rounds per update: {pr['traffic']['rounds'] / pr['traffic']['n']:.2f}")
    ch = res.get("churn")
    if ch:
        p()
        p(f"3. Churn: wrk -c {cfg.conns} on one upstream (2 workers, 4 alive backends) for "
          f"{ch['secs']:.1f} s while it is replaced / added to / removed from via REST")
        p(f"   updates: {ch['updates_ok']} ok, {ch['updates_failed']} failed, "
          f"{ch['rate']:.0f}/s (one client, sequential; update p50 {fmt_ms(ch['update_p50'])} ms, "
          f"p99 {fmt_ms(ch['update_p99'])} ms)")
        p(f"   requests: {ch['requests']} ({ch['rps']:.0f}/s), non-2xx {ch['non2xx']}, "
          f"socket errors {ch['sockerr']}, nginx error-log lines {ch['errors_in_log']}")
    sc = res.get("scale")
    if sc:
        p()
        p(f"4. Scale: N upstreams x 4 servers, seeded from an upstream file, size = \"{cfg.scale_size}\", "
          f"2 workers")
        p(f"   {'N':>6s} {'start s':>7s} {'file KiB':>9s} {'seed KiB':>9s} {'RSS kB':>8s} "
          f"{'upd p50':>8s} {'upd p99':>8s} {'vis p50':>8s} {'vis p99':>8s} {'vis max':>8s} "
          f"{'rps quiet':>9s} {'rps churn':>9s} {'ratio':>6s} {'upd/s':>6s}")
        for r in sc:
            p(f"   {r['n']:6d} {r['start_s']:7.2f} {r['file_bytes'] >> 10:9d} {r['seed_bytes'] >> 10:9d} "
              f"{r['rss_kb']:8d} {fmt_ms(r['update_p50']):>8s} {fmt_ms(r['update_p99']):>8s} "
              f"{fmt_ms(r['prop_p50']):>8s} {fmt_ms(r['prop_p99']):>8s} {fmt_ms(r['prop_max']):>8s} "
              f"{r['rps_quiet']:9.0f} {r['rps_churn']:9.0f} {r['churn_ratio']:6.3f} {r['churn_rate']:6.0f}")
        p("   (times in ms; upd = client-side REST POST latency; vis = until both workers route by it;"
          " ratio = req/s on unchanged u0 while others churn / quiet;"
          f" upd/s = churn rate achieved, target {cfg.scale_rate}/s)")
        p(f"   the same unchanged u0 while others churn at {cfg.scale_fast_rate} updates/s ("
          + (f"init {cfg.scale_init.strip()}" if cfg.scale_init else "durable, msync in thread pool \"dyups\"")
          + f"), {cfg.scale_rounds} rounds of quiet / {cfg.scale_rate}/s / {cfg.scale_fast_rate}/s"
          + (f" / {cfg.scale_fast_rate} reads/s (N = 1)" if any("reads" in r for r in sc) else "")
          + f" x {cfg.scale_secs} s, writes from lua/writer.lua:")
        p(f"   {'N':>6s} {'rps quiet':>9s} {'rps churn':>9s} {'ratio':>6s} {'(medians)':>9s} {'upd/s':>6s} "
          f"{'upd p50':>8s} {'upd p99':>8s} {'failed':>6s} {'p99 quiet':>9s} {'p99 churn':>9s}"
          f"   quiet / churn req/s per round")
        for r in sc:
            f = r["fast"]
            p(f"   {r['n']:6d} {r['rps_quiet']:9.0f} {f['rps']:9.0f} {f['ratio_paired']:6.3f} {f['ratio']:9.3f} "
              f"{f['rate']:6.0f} {fmt_ms(f['update_p50']):>8s} {fmt_ms(f['update_p99']):>8s} {f['failed']:6.0f} "
              f"{r['p99_quiet']:9.2f} {f['p99']:9.2f}   "
              + " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(r["rps_quiet_all"], f["rps_all"])))
        p(f"   CPU a write costs, without traffic ({cfg.scale_fast_rate}/s for {cfg.scale_secs} s): "
          + "; ".join(f"N={r['n']}: workers {r['cost']['workers_us']:.0f} µs (at {r['cost']['rate']:.0f}/s), "
                      f"writer {r['cost']['writer_us']:.0f} µs" for r in sc))
        for r in sc:
            rd = r["cost"].get("read")
            if rd:
                p(f"   ... and a read (GET /list), N={r['n']}: workers {rd['workers_us']:.0f} µs, "
                  f"writer {rd['writer_us']:.0f} µs; {cfg.scale_fast_rate} writes/s of N={r['n']} take "
                  f"{r['cost']['workers_us'] * cfg.scale_fast_rate / 1e4 / 2:.1f} % of 2 CPUs in the workers")
        for r in sc:
            if "reads" in r:
                rd = r["reads"]
                p(f"   control, N={r['n']}: {rd['rate']:.0f} reads/s (GET /list) instead of writes: {rd['rps']:.0f} "
                  f"req/s, ratio {rd['ratio_paired']:.3f}")
        p("   (ratio: median of the per-round ratios churn/quiet, paired; (medians): ratio of the medians;"
          " upd = client-side REST POST latency during that churn, median over the rounds of each round's"
          " p50 / p99; failed = updates not answered 200; p99 quiet / churn: wrk's p99 latency on u0, medians)")
    po = res.get("policies")
    if po:
        p()
        p(f"5. Policies: nginx upstream vs the same upstream in ngx.dyups (balance(\"NAME\"), log_by_lua_file "
          f"lua/log.lua for least_conn / random two), same policy, same 2 backends, 1 proxy worker each; native {', '.join(NATIVE_ZONE)} "
          f"with `zone`; wrk -s lua/keys.lua cycles {POLICY_KEYS} keys (hash, ip_hash); "
          f"{cfg.pol_rounds} interleaved rounds x {cfg.pol_secs} s, medians")
        p(f"   {'policy':24s} {'proxy':7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}"
          f"  {'dyups/native':>12s}  {'us/req':>6s} {'busy':>4s} {'cpu d/n':>7s}   req/s per round")
        floors = [(n, label) for n, label in FLOOR_ROWS if n in po]
        for name, line in [(n, line) for n, line, _ in POLICIES] + floors:
            o = po[name]
            for k, pname in enumerate(("native", "dyups")):
                r = o[pname]
                ratio = (f"{o['ratio_paired']:.3f} ({o['ratio']:.3f})" if pname == "dyups" else "")
                cpu = f"{o['cpu_ratio_paired']:.3f}" if pname == "dyups" else ""
                p(f"   {(policy_label(line) if k == 0 else ''):24s} {pname:7s} {r['rps']:8.0f} {r['p50']:8.3f} "
                  f"{r['p99']:8.3f} {r['errors']:7d}  {ratio:>12s}  {r['cpu_us']:6.2f} "
                  f"{r['busy'] * 100:3.0f}% {cpu:>7s}   "
                  + " ".join(f"{x:.0f}" for x in r["rps_all"]))
        p("   (dyups/native: median of the per-round ratios, paired; in brackets the ratio of the medians."
          " us/req: the proxy worker's CPU time (user + system) per request served, median of the rounds;"
          " busy: its CPU time over the run's wall time; cpu d/n: dyups/native us/req, median of the"
          " per-round ratios; the floor rows: lua-nginx-module's least, a Lua balancer that only calls"
          " set_current_peer (bench_rr), alone and with a log_by_lua_file of an empty file, in the dyups"
          " proxy, against native round robin)")
        keyed = [n for n, _, mode in POLICIES if mode != "none"]
        p("   same backend for both proxies: "
          + ", ".join(f"{policy_label(po[n]['policy'])} {po[n]['agree']}/{po[n]['checked']} keys"
                      f" ({po[n]['backends_seen']} backends used)" for n in keyed))
        p(f"   keyless, {po[KEYLESS[0]]['checked']} requests one by one: "
          + ", ".join(f"{policy_label(po[n]['policy'])} {po[n]['backends_seen']} backends used through both"
                      for n in KEYLESS))
        p(f"   share of each backend under load (untimed wrk -c {cfg.conns} run of {cfg.pol_share_secs} s "
          f"per proxy, answers counted): "
          + "; ".join(f"{policy_label(po[n]['policy'])} native "
                      + "/".join(f"{x * 100:.1f}" for x in po[n]["share"]["native"]) + " %, dyups "
                      + "/".join(f"{x * 100:.1f}" for x in po[n]["share"]["dyups"]) + " %"
                      + (f" ({po[n]['share_errors']} errors)" if po[n]["share_errors"] else "")
                      for n in KEYLESS))
        p("   dyups.peers() conns (whole nginx): "
          + "; ".join(f"{policy_label(po[n]['policy'])} during that run max "
                      f"{max(po[n]['conns_samples'], default=0)} (median {med(po[n]['conns_samples']):.0f}, "
                      f"{len(po[n]['conns_samples'])} samples), after the rounds "
                      f"{'+'.join(map(str, po[n]['conns_after_rounds']))}, after that run "
                      f"{'+'.join(map(str, po[n]['conns_after']))}"
                      for n in KEYLESS)
          + " (round robin and random count none)")
        p(f"   nginx error-log lines: native {po['errors_in_log']['native']}, "
          f"dyups {po['errors_in_log']['dyups']}")
    sync_targets = sync_bench.report_sync(sys.modules[__name__], cfg, res, p)
    checks_bench.report(cfg, res, p)
    # targets
    p()
    p("Targets (reported, not asserted):")
    rows = []

    def target(label, value, ok, shown):
        rows.append((label, shown, "PASS" if ok else "MISS") if value is not None else
                    (label, shown, "SKIP"))

    if tp:
        target("dyups >= 0.97 x minimal-Lua req/s", 1, tp["ratio_minlua_paired"] >= 0.97,
               f"{tp['ratio_minlua_paired']:.3f}")
        target("dyups >= 0.88 x native req/s", 1, tp["ratio_native_paired"] >= 0.88,
               f"{tp['ratio_native_paired']:.3f}")
    if pr:
        t = pct(pr["traffic"]["times"], 99)
        target("propagation p99 <= 5 ms with traffic", 1, t <= 0.005, f"{fmt_ms(t)} ms")
        t = pct(pr["idle"]["times"], 99)
        target("propagation p99 <= 250 ms idle", 1, t <= 0.25, f"{fmt_ms(t)} ms")
    if ch:
        f = ch["non2xx"] + ch["sockerr"]
        target("zero failed requests under churn", 1, f == 0,
               f"{f} failed of {ch['requests']} ({ch['rate']:.0f} updates/s)")
    if sc:
        one = [r for r in sc if r["n"] == 1]
        if one:
            f = one[0]["fast"]
            target(f"1 upstream: an unchanged upstream keeps >= 0.97 x quiet req/s while "
                   f"{cfg.scale_fast_rate} writes/s arrive (durable)", 1, f["ratio_paired"] >= 0.97,
                   f"{f['ratio_paired']:.3f} at {f['rate']:.0f} writes/s")
        big = [r for r in sc if r["n"] >= 10000]
        if big:
            r = big[-1]
            target("10,000 upstreams: visible in all workers <= 10 ms (p99)", 1,
                   r["prop_p99"] <= 0.010, f"{fmt_ms(r['prop_p99'])} ms")
            target("10,000 upstreams: no drop on an unchanged upstream (churn/quiet >= 0.95)", 1,
                   r["churn_ratio"] >= 0.95, f"{r['churn_ratio']:.3f}")
        else:
            target("10,000 upstreams: visible in all workers <= 10 ms", None, False,
                   f"not run (QUICK stops at {sc[-1]['n']}; N={sc[-1]['n']}: "
                   f"{fmt_ms(sc[-1]['prop_p99'])} ms)")
            target("10,000 upstreams: no drop on an unchanged upstream", None, False,
                   f"not run (QUICK; N={sc[-1]['n']}: ratio {sc[-1]['churn_ratio']:.3f})")
    if po:
        names = [n for n, _, _ in POLICIES]
        worst = min(names, key=lambda n: po[n]["ratio_paired"])
        target("every method: dyups >= 0.95 x native req/s (paired)", 1,
               po[worst]["ratio_paired"] >= 0.95,
               f"lowest {po[worst]['ratio_paired']:.3f} ({policy_label(po[worst]['policy'])})")
        worst = max(names, key=lambda n: po[n]["cpu_ratio_paired"])
        target("every method: proxy worker CPU per request <= 1.05 x native (paired)", 1,
               po[worst]["cpu_ratio_paired"] <= 1.05,
               f"highest {po[worst]['cpu_ratio_paired']:.3f} ({policy_label(po[worst]['policy'])})")
    for t in sync_targets:
        target(*t)
    checks_bench.targets(res, target)
    if not rows:
        p("   (none in the sections run)")
    w = max((len(r[0]) for r in rows), default=0)
    for label, shown, verdict in rows:
        p(f"   {verdict:4s}  {label:{w}s}  {shown}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="temp directory for the nginx prefixes")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="1234567")
    ap.add_argument("--json", help="also write the raw results here")
    cfg = ap.parse_args()
    q = cfg.quick
    cfg.rounds = 3 if q else 7
    cfg.secs = 3 if q else 5
    cfg.conns = 32
    cfg.threads = 1
    cfg.bg_conns = 4
    cfg.prop_n = 100 if q else 300
    cfg.churn_secs = 5 if q else 15
    cfg.scale = [1, 100, 1000] if q else [1, 100, 1000, 10000]
    if os.environ.get("BENCH_SCALE"):  # e.g. BENCH_SCALE=1,100: section 4 for these N only
        cfg.scale = [int(x) for x in os.environ["BENCH_SCALE"].split(",")]
    cfg.scale_size = "16m"
    cfg.scale_rate = 20  # updates/s on other upstreams during the scale throughput runs
    cfg.scale_fast_rate = 400  # and the second rate (issue 11: a write must not stall traffic)
    # Extra init options for section 4's proxies, e.g. BENCH_SCALE_INIT='durable = false,'
    cfg.scale_init = os.environ.get("BENCH_SCALE_INIT", "")
    cfg.scale_updates = 20 if q else 50
    cfg.scale_rounds = 2 if q else 5
    cfg.scale_secs = 2 if q else 3
    cfg.pol_rounds = 2 if q else 5  # section 5: rounds of 7 policies x 2 proxies
    cfg.pol_secs = 2 if q else 3
    cfg.pol_warm = 1
    cfg.pol_share_secs = 1 if q else 2  # untimed counted run per keyless policy and proxy
    cfg.pol_check = 50  # keys checked to reach the same backend through both proxies
    cfg.sync_puts = 200 if q else 1000  # section 6: puts timed on 3 hosts
    cfg.sync_scale = [1000, 10000] if q else [1000, 10000, 100000]
    if "BENCH_SYNC_SCALE" in os.environ:  # e.g. BENCH_SYNC_SCALE=100000; empty: none
        cfg.sync_scale = [int(x) for x in os.environ["BENCH_SYNC_SCALE"].split(",") if x]
    cfg.sync_scale_puts = 20 if q else 50
    # section 7: checked servers, "k" for the keep-alive probes variant
    checks = os.environ.get("BENCH_CHECKS") or ("1000,1000k" if q else "1000,1000k,10000,10000k")
    cfg.check_runs = [(int(x.rstrip("k")), x.endswith("k")) for x in checks.split(",")]
    cfg.check_secs = 4 if q else 10  # idle windows, checks on and off
    # hot upstream, checks on / off (a round is one run of each)
    cfg.check_rounds = int(os.environ.get("BENCH_CHECK_ROUNDS") or (3 if q else 9))
    cfg.check_settle = 2  # s after turning the checks on or off, before a run

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    t_start = now()
    res = {}
    try:
        backends = [free_port() for _ in range(4)]
        be = Nginx(cfg.root, "backends", 1, backends_conf(backends), lua=False)
        be.start(backends)
        log(f"backends: 127.0.0.1:{', '.join(map(str, backends))} (pid {be.master})")
        sections = [("1", "throughput", section_throughput), ("2", "propagation", section_propagation),
                    ("3", "churn", section_churn), ("4", "scale", section_scale),
                    ("5", "policies", section_policies),
                    ("6", "sync", lambda *a: sync_bench.section_sync(sys.modules[__name__], *a)),
                    ("7", "checks", lambda *a: checks_bench.section_checks(sys.modules[__name__], *a))]
        for key, name, fn in sections:
            if key in cfg.sections:
                t = now()
                log(f"== {key}. {name}")
                fn(cfg, cfg.root, backends, res)
                log(f"   ({now() - t:.0f} s)")
    finally:
        stop_all()
    report(cfg, res, now() - t_start)
    if cfg.json:
        for sec in res.values():
            if isinstance(sec, dict):
                sec.pop("raw", None)
        with open(cfg.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        log(f"bench: interrupted ({e}); nginx stopped")
        sys.exit(130)
