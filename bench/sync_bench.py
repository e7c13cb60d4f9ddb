"""bench/sync_bench.py: section 6 of `make bench`, `dyups sync` (README,
"Many hosts"). dyups_bench.py runs it and passes itself in as `b`: its nginx
instances, ports, probes and the registries of what to stop on exit.

  6a. convergence: a 3-member etcd on loopback and 3 nginx hosts of 2
      workers, each with its own `dyups sync`; puts one by one, each timed
      from its response until every worker of every host routes by it; the
      CPU etcd and the agents spend per change;
  6b. table size: N upstreams x 4 servers in etcd (up to 100,000), one host
      of 2 workers: the agent's first full read, its peak RSS, then puts,
      each one's write in the agent and its visibility in both workers.

Every etcd member and agent is a child of this process, stopped by its pid
(b.CHILDREN); each also leaves a pid file under ROOT/pids/, which run.sh's
trap uses when the driver itself is killed.
"""

import base64
import http.client
import json
import os
import random
import re
import signal
import subprocess
import time

# DYUPS_BIN: another build of the tool, to compare (bench/README.md).
DYUPS = os.environ.get("DYUPS_BIN") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "dyups")
ETCD = os.environ.get("ETCD", "/usr/bin/etcd")
# A transaction of this many puts loads the big tables (etcd's default, 128,
# would take 782 transactions for 100,000 keys).
TXN_OPS = 1000


def b64(text):
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def body_of(ports):
    return " ".join(f"server 127.0.0.1:{p};" for p in ports)


def record_pid(root, name, pid):
    os.makedirs(os.path.join(root, "pids"), exist_ok=True)
    with open(os.path.join(root, "pids", f"{name}.pid"), "w") as f:
        f.write(f"{pid}\n")


def spawn(b, root, name, argv, log_path):
    """A child in its own session (a Ctrl-C reaches it through our cleanup,
    not the terminal), stopped by b.stop_all()."""
    log = open(log_path, "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True)
    log.close()
    b.CHILDREN.append(p)
    record_pid(root, name, p.pid)
    return p


def stop(p, sig=signal.SIGTERM, limit=10.0):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(limit)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Etcd:
    """A cluster of `n` members on loopback, each with its own ports and data
    directory under ROOT/etcd/; its JSON gateway as the client."""

    def __init__(self, b, root, n=3):
        self.b, self.root = b, root
        self.dir = os.path.join(root, "etcd")
        os.makedirs(self.dir, exist_ok=True)
        self.members = [{"name": f"m{i + 1}", "client": b.free_port(), "peer": b.free_port()}
                        for i in range(n)]
        self.initial = ",".join(f"{m['name']}=http://127.0.0.1:{m['peer']}" for m in self.members)
        self.conn = None

    def endpoints(self):
        return ",".join(f"http://127.0.0.1:{m['client']}" for m in self.members)

    def start(self, timeout=30):
        for m in self.members:
            data = os.path.join(self.dir, m["name"])
            m["proc"] = spawn(self.b, self.root, f"etcd-{m['name']}", [
                ETCD, "--name", m["name"], "--data-dir", data,
                "--listen-client-urls", f"http://127.0.0.1:{m['client']}",
                "--advertise-client-urls", f"http://127.0.0.1:{m['client']}",
                "--listen-peer-urls", f"http://127.0.0.1:{m['peer']}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m['peer']}",
                "--initial-cluster", self.initial, "--initial-cluster-token", self.dir,
                "--initial-cluster-state", "new", "--max-txn-ops", str(TXN_OPS),
                "--log-level", "warn",
            ], data + ".log")
        deadline = self.b.now() + timeout
        while True:
            try:
                self.call("/v3/kv/put", {"key": b64("/health-check"), "value": b64("1")})
                return self
            except (OSError, RuntimeError, http.client.HTTPException):
                if self.b.now() > deadline:
                    raise RuntimeError("etcd cluster did not take a write in "
                                       f"{timeout} s; logs in {self.dir}")
                self.conn = None
                time.sleep(0.2)

    def pids(self):
        return [m["proc"].pid for m in self.members]

    def stop(self):
        for m in self.members:
            stop(m["proc"])

    def call(self, path, body, member=0):
        """One call of the JSON gateway over a kept-alive connection to a
        member (a put on a follower is forwarded to the leader by etcd)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.members[member]["client"],
                                                   timeout=30)
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {r.status}: {data[:300]!r}")
        return json.loads(data)

    def put(self, key, value):
        """Returns the revision of the put, once etcd answered it."""
        return int(self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})
                   ["header"]["revision"])

    def load(self, prefix, n, servers):
        """`n` upstreams u0 .. u{n-1} of 4 servers each, in transactions of
        TXN_OPS puts."""
        for start in range(0, n, TXN_OPS):
            ops = [{"request_put": {"key": b64(f"{prefix}upstreams/u{i}"),
                                    "value": b64(body_of(servers[i % 4:] + servers[:i % 4]))}}
                   for i in range(start, min(n, start + TXN_OPS))]
            self.call("/v3/kv/txn", {"success": ops})

    def cpu(self):
        return sum(self.b.cpu_s(p) for p in self.pids())


class Host:
    """An nginx of 2 workers (the README's configuration, dyups_conf) with its
    own state file and its own `dyups sync`."""

    def __init__(self, b, root, name, etcd, prefix, size, local=True):
        self.b, self.root, self.name, self.etcd, self.prefix = b, root, name, etcd, prefix
        self.port, self.api = b.free_port(), b.free_port()
        # A local upstream, which the agent keeps; none where etcd's take
        # all the table has room for (100,000).
        seed = {"conf/upstream.conf": "upstream local_one { server 127.0.0.1:1; }\n" if local else ""}
        self.inst = b.Nginx(root, name, 2, b.dyups_conf(self.port, self.api, size=size),
                            files=seed, main=b.DYUPS_MAIN)
        self.state = os.path.join(self.inst.prefix, "state", "dyups.state")
        self.log = os.path.join(self.inst.prefix, "logs", "sync.log")
        self.agent = None

    def start(self):
        self.inst.start([self.port, self.api])
        self.workers = set(self.inst.worker_pids())
        return self

    def start_agent(self):
        self.agent = spawn(self.b, self.root, f"sync-{self.name}", [
            DYUPS, "sync", "--etcd", self.etcd.endpoints(), "--prefix", self.prefix,
            "--state", self.state], self.log)
        return self.agent

    def stop(self):
        if self.agent:
            stop(self.agent)
        self.inst.stop()

    def revision(self):
        """The etcd revision the agent reports in PATH.sync, written after
        each write it makes has returned (msync included)."""
        try:
            with open(self.state + ".sync") as f:
                return json.load(f).get("revision", 0)
        except (OSError, ValueError):
            return 0

    def count_errors(self):
        """nginx's error-log lines, but for those the probes cause on
        purpose: requests for an upstream that is not there yet."""
        try:
            with open(os.path.join(self.inst.prefix, "logs", "error.log"), errors="replace") as f:
                return sum(1 for line in f
                           if re.search(r"\[(error|crit|alert|emerg)\]", line)
                           and "no upstream \"" not in line and "no live upstreams" not in line)
        except OSError:
            return 0

    def log_lines(self):
        with open(self.log, errors="replace") as f:
            return f.read().splitlines()

    def conns(self, name):
        """One kept-alive connection to each worker, Host: `name`
        (section 2's Pinned: the X-Worker header says which worker)."""
        return self.b.Pinned(self.port, "/host", name, self.workers)


def until_all(pinned, done, t0, limit):
    """One request on every worker's connection (all hosts at once) that has
    not answered `done(status, body)` yet, again and again: the seconds from
    t0 until all have, or inf after `limit` s."""
    todo = {(i, pid) for i, p in enumerate(pinned) for pid in p.conns}
    while todo:
        for i, pid in todo:
            pinned[i].conns[pid].send("GET", pinned[i].path, None, pinned[i].host)
        for i, pid in list(todo):
            st, body = pinned[i].conns[pid].recv()
            if done(st, body):
                todo.discard((i, pid))
        if todo and b_now() - t0 > limit:
            return float("inf")
    return b_now() - t0


def b_now():
    return time.monotonic()


def routes_to(port):
    return lambda st, body: st == 200 and body.split()[0].decode() == str(port)


# A write's log line; from this build on it ends with the write's time.
WROTE = re.compile(r"^dyups sync: revision \d+: version \d+ ")


def applied_ms(lines):
    """The agent's write times (ms), from its log lines `revision R: version
    V (...) in X ms`."""
    return [float(m.group(1)) for m in (re.search(r"\) in ([\d.]+) ms$", line) for line in lines) if m]


def hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def at_rest(hosts, rev, limit=30):
    """Until every agent has finished its write of revision `rev` (its
    msync ends after the workers route by the table): the next put then
    finds it at rest, and its time is its own, not the tail of this one."""
    wait_for(lambda: all(h.revision() >= rev for h in hosts), limit, f"the agents' write of {rev}")


def wait_for(cond, limit, what):
    deadline = b_now() + limit
    while not cond():
        if b_now() > deadline:
            raise RuntimeError(f"sync: {what} not within {limit} s")
        time.sleep(0.005)


def converge_run(b, cfg, root, backends, etcd):
    """6a: 3 hosts, puts of one upstream one at a time."""
    hosts = [Host(b, root, f"p-sync-{i + 1}", etcd, "/bench/", "2m").start() for i in range(3)]
    for h in hosts:
        h.start_agent()
    name = "s0"
    first = backends[0]
    etcd.put(f"/bench/upstreams/{name}", body_of([first]))
    pinned = [h.conns(name) for h in hosts]
    if until_all(pinned, routes_to(first), b_now(), 30) == float("inf"):
        raise RuntimeError("sync: the first put did not reach every worker in 30 s")
    agents = [h.agent.pid for h in hosts]
    # What etcd and the agents spend with nothing to do (heartbeats, the
    # agents' quorum probes), over as long as the puts take, to subtract.
    idle_secs = 3.0
    e0, a0, t0 = etcd.cpu(), sum(b.cpu_s(p) for p in agents), b_now()
    time.sleep(idle_secs)
    idle = {"etcd": (etcd.cpu() - e0) / (b_now() - t0),
            "agents": (sum(b.cpu_s(p) for p in agents) - a0) / (b_now() - t0)}
    logs_before = [len(h.log_lines()) for h in hosts]
    times = []
    e0, a0, t0 = etcd.cpu(), sum(b.cpu_s(p) for p in agents), b_now()
    k = 0
    for i in range(cfg.sync_puts):
        k = (k + 1) % len(backends)
        port = backends[k]
        rev = etcd.put(f"/bench/upstreams/{name}", body_of([port]))
        start = b_now()
        times.append(until_all(pinned, routes_to(port), start, 5.0))
        at_rest(hosts, rev)
        # Apart, as a controller's changes arrive: each its own watch event.
        time.sleep(random.uniform(0.002, 0.01))
    secs = b_now() - t0
    e_cpu, a_cpu = etcd.cpu() - e0, sum(b.cpu_s(p) for p in agents) - a0
    n = cfg.sync_puts
    applied = []
    for h, before in zip(hosts, logs_before):
        applied += applied_ms(h.log_lines()[before:])
    for p in pinned:
        for c in p.conns.values():
            c.s.close()
    out = {"n": n, "times": times, "secs": secs,
           "etcd_us": e_cpu / n * 1e6, "agents_us": a_cpu / n * 1e6,
           "etcd_net_us": (e_cpu - idle["etcd"] * secs) / n * 1e6,
           "agents_net_us": (a_cpu - idle["agents"] * secs) / n * 1e6,
           "idle": idle, "applied_ms": applied,
           "errors_in_log": sum(h.count_errors() for h in hosts)}
    b.log(f"  [6] {n} puts, 3 hosts x 2 workers: visible p50 {b.pct(times, 50) * 1e3:.2f} ms p99 "
          f"{b.pct(times, 99) * 1e3:.2f} ms max {max(times) * 1e3:.2f} ms; etcd "
          f"{out['etcd_us']:.0f} us CPU a change ({out['etcd_net_us']:.0f} net of idle), agents "
          f"{out['agents_us']:.0f} us ({out['agents_net_us']:.0f} net); agent write p50 "
          f"{b.pct(applied, 50):.2f} ms")
    for h in hosts:
        h.stop()
    return out


def scale_run(b, cfg, root, backends, etcd, n):
    """6b: one host following a prefix of `n` upstreams."""
    prefix = f"/scale{n}/"
    t0 = b_now()
    etcd.load(prefix, n, backends[:4])
    load_s = b_now() - t0
    size = "64m" if n > 20000 else "16m"
    host = Host(b, root, f"p-sync-n{n}", etcd, prefix, size, local=False).start()
    last = f"u{n - 1}"
    pinned = [host.conns(last)]
    t0 = b_now()
    agent = host.start_agent()
    read = re.compile(rf"read {n} upstreams from etcd")
    wait_for(lambda: any(read.search(line) for line in host.log_lines()), 600, "the full read")
    full_s = b_now() - t0
    visible_s = until_all(pinned, lambda st, _: st == 200, t0, 120)
    if visible_s == float("inf"):
        raise RuntimeError(f"sync: N={n}: {last} not routed 120 s after the start; "
                           f"the agent's log: {host.log}")
    full_hwm = hwm_kb(agent.pid)
    reading = [float(m.group(1)) for m in (re.search(r"\(([\d.]+) s reading etcd\)", line)
                                           for line in host.log_lines()) if m]
    for c in pinned[0].conns.values():
        c.s.close()
    pinned = [host.conns("u0")]
    logs_before = len(host.log_lines())
    cpu0 = b.cpu_s(agent.pid)
    wcpu0 = sum(b.cpu_s(w) for w in host.workers)
    times = []
    k = 0
    for i in range(cfg.sync_scale_puts):
        k = (k + 1) % len(backends)
        port = backends[k]
        rev = etcd.put(f"{prefix}upstreams/u0", body_of([port]))
        start = b_now()
        times.append(until_all(pinned, routes_to(port), start, 30.0))
        at_rest([host], rev)
        time.sleep(random.uniform(0.002, 0.01))
    put_cpu_ms = (b.cpu_s(agent.pid) - cpu0) / cfg.sync_scale_puts * 1e3
    # Each worker's CPU a put: its refresh, and the few probe requests.
    worker_cpu_ms = ((sum(b.cpu_s(w) for w in host.workers) - wcpu0) / cfg.sync_scale_puts
                     / len(host.workers) * 1e3)
    # The agent may log the last write just after the workers route by it.
    wait_for(lambda: sum(1 for line in host.log_lines()[logs_before:] if WROTE.search(line))
             >= cfg.sync_scale_puts, 30, "the agent's log of the puts")
    applied = applied_ms(host.log_lines()[logs_before:])
    for c in pinned[0].conns.values():
        c.s.close()
    slot = None
    r = subprocess.run([DYUPS, "inspect", "--state", host.state, "--json"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        found = json.loads(r.stdout)
        slot = max(s.get("payload_len", 0) for s in found.get("slots", []))
    row = {"n": n, "size": size, "load_s": load_s, "full_s": full_s, "visible_s": visible_s,
           "range_s": reading[0] if reading else float("nan"),
           "agent_hwm_kb": full_hwm, "agent_hwm_after_kb": hwm_kb(agent.pid),
           "worker_rss_kb": max(b.rss_kb(w) for w in host.workers), "payload_bytes": slot,
           "times": times, "applied_ms": applied, "put_cpu_ms": put_cpu_ms, "worker_cpu_ms": worker_cpu_ms,
           "errors_in_log": host.count_errors()}
    b.log(f"  [6] N={n}: etcd loaded in {load_s:.1f} s; full read {full_s:.2f} s (every worker "
          f"routes by it at {visible_s:.2f} s), agent peak RSS {full_hwm} kB; a put: agent write p50 "
          f"{b.pct(applied, 50):.1f} ms p99 {b.pct(applied, 99):.1f} ms ({put_cpu_ms:.1f} ms CPU, each worker {worker_cpu_ms:.1f} ms), "
          f"visible p50 {b.pct(times, 50) * 1e3:.1f} ms p99 {b.pct(times, 99) * 1e3:.1f} ms")
    host.stop()
    return row


def section_sync(b, cfg, root, backends, res):
    for path, what in ((ETCD, "etcd (Debian package etcd-server; make deps installs it)"),
                       (DYUPS, "bin/dyups (make build)")):
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"sync: {path} missing: {what}")
    etcd = Etcd(b, root).start()
    try:
        out = {"converge": converge_run(b, cfg, root, backends, etcd), "scale": []}
        for n in cfg.sync_scale:
            out["scale"].append(scale_run(b, cfg, root, backends, etcd, n))
    finally:
        etcd.stop()
    res["sync"] = out


def report_sync(b, cfg, res, p):
    """Prints section 6; returns its targets as (label, value, ok, shown)."""
    sy = res.get("sync")
    if not sy:
        return []
    c = sy["converge"]
    t, a = c["times"], c["applied_ms"]
    fmt = b.fmt_ms
    p()
    p(f"6. Sync: a 3-member etcd on loopback, 3 hosts x 2 workers, each host with its own dyups sync "
      f"(durable writes); {c['n']} puts of one upstream one by one, each 2-10 ms after the agents "
      f"finished the last one's write, timed from etcd's answer until every worker of every host "
      f"routes by it")
    p(f"   visible: p50 {fmt(b.pct(t, 50))} ms, p99 {fmt(b.pct(t, 99))} ms, max {fmt(max(t))} ms "
      f"({c['secs']:.1f} s in all); the agents' writes (their log): p50 {b.pct(a, 50):.2f} ms, "
      f"p99 {b.pct(a, 99):.2f} ms")
    p(f"   CPU a change: etcd (3 members) {c['etcd_us']:.0f} us ({c['etcd_net_us']:.0f} us net of "
      f"its idle {c['idle']['etcd'] * 100:.1f} % of a CPU), the 3 agents {c['agents_us']:.0f} us "
      f"({c['agents_net_us']:.0f} us net; {c['agents_net_us'] / 3:.0f} us each); nginx error-log "
      f"lines {c['errors_in_log']}")
    if sy["scale"]:
        p("   N upstreams x 4 servers in etcd, one host (2 workers) following them: its first full read, "
          f"then {cfg.sync_scale_puts} puts of u0 one by one")
        p(f"   {'N':>7s} {'size':>5s} {'slot KiB':>9s} {'load s':>6s} {'full s':>6s} {'range s':>7s} {'vis s':>6s} "
          f"{'agent kB':>9s} {'worker kB':>9s} {'write p50':>9s} {'write p99':>9s} {'cpu ms':>6s} {'wkr ms':>6s} "
          f"{'vis p50':>8s} {'vis p99':>8s} {'vis max':>8s} {'err':>4s}")
        for r in sy["scale"]:
            p(f"   {r['n']:7d} {r['size']:>5s} {(r['payload_bytes'] or 0) >> 10:9d} {r['load_s']:6.1f} "
              f"{r['full_s']:6.2f} {r['range_s']:7.2f} {r['visible_s']:6.2f} {r['agent_hwm_kb']:9d} {r['worker_rss_kb']:9d} "
              f"{b.pct(r['applied_ms'], 50):9.1f} {b.pct(r['applied_ms'], 99):9.1f} {r['put_cpu_ms']:6.1f} {r['worker_cpu_ms']:6.1f} "
              f"{fmt(b.pct(r['times'], 50)):>8s} {fmt(b.pct(r['times'], 99)):>8s} {fmt(max(r['times'])):>8s} "
              f"{r['errors_in_log']:4d}")
        p("   (load s: the upstreams put into etcd in transactions of 1,000; full s: from the agent's start "
          "until it logged the read written; range s: of which reading etcd (pages of 1,000 keys); vis s: until both workers route by the last upstream; agent kB: "
          "its peak RSS (VmHWM) after the full read; worker kB: the larger worker VmRSS at the end; write: "
          "the agent's store write of one put, msync included (its log), ms; cpu ms: the agent's CPU a put; wkr ms: each worker's (its refresh, and the probes); "
          "vis: from the put's answer until both workers route by it, ms; err: nginx error-log lines, "
          "but for the probes' own requests for an upstream not there yet)")
    out = [("sync: a put visible on every worker of 3 hosts <= 100 ms (p99)", 1,
            b.pct(t, 99) <= 0.100, f"{fmt(b.pct(t, 99))} ms")]
    big = [r for r in sy["scale"] if r["n"] >= 100000]
    if big:
        r = big[-1]
        out.append(("sync: 100,000 upstreams, a put visible <= 20 ms (p99)", 1,
                    b.pct(r["times"], 99) <= 0.020, f"{fmt(b.pct(r['times'], 99))} ms"))
    else:
        largest = sy["scale"][-1] if sy["scale"] else None
        out.append(("sync: 100,000 upstreams, a put visible <= 20 ms (p99)", None, False,
                    "not run (QUICK)" + (f"; N={largest['n']}: {fmt(b.pct(largest['times'], 99))} ms"
                                         if largest else "")))
    return out
