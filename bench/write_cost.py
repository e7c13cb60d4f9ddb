#!/usr/bin/env python3
"""bench/write_cost.py: what one REST write costs nginx's workers, without
traffic, in CPU time and in instructions; builds side by side.

    python3 bench/write_cost.py [--so A.so,B.so] [--rounds 7] [--secs 3]
                                [--rate 400] [--n 1] [--read] [--init 'durable = false,']
    python3 bench/write_cost.py --callgrind [--so A.so] [--secs 10] [--rate 20]

Section 4's proxy (bench/dyups_bench.py's configuration: 2 workers, a 16 MiB
state file seeded with N upstreams of 4 servers, the thread pool `dyups`)
and section 4's writer (lua/writer.lua: one keep-alive connection, `POST
/upstream/NAME` replacing a random upstream with 1 to 4 servers at a steady
rate; with `--read`, `GET /list` instead).

CPU mode: one proxy per build given (`--so`, default lib/ngx/dyups.so), all
started at once and measured in turn, round after round, so that the
machine's load falls on every build alike. Per round and build: the CPU
time of both workers (every thread: the msync runs in nginx's thread pool,
scheduler nanoseconds from /proc/PID/task/TID/schedstat), its user and
system split, the minor page faults and the bytes made dirty for the disk
(/proc/PID/io write_bytes), each divided by the writes answered. Printed: each build's median over the rounds.

Callgrind mode (`--callgrind`, needs valgrind): the first build's proxy,
twice, under `valgrind --tool=callgrind`, both workers counted from start
to exit (callgrind_control cannot reach forked workers): one run writes
at `--rate` for `--warm` + `--secs` seconds over one connection, the other
stops after the warm-up and waits as long; the second run's counts are
subtracted from the first's, per worker. Printed: instructions per write
in the worker that served it and in the other, by object, and the
inclusive cost of ngx.dyups' entry points and of the store's steps. User
space only: the kernel's share (msync, page faults, sockets) is in the CPU
mode's system time.

Every nginx it starts is stopped when it ends.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dyups_bench as db  # noqa: E402  (section 4's configuration and writer)
import callgrind_policies as cg  # noqa: E402  (reading callgrind's output)

# Inclusive costs callgrind mode prints, when they ran (a name matches a
# function whose demangled name ends with it).
DETAIL = [
    "ngx_http_lua_content_handler",
    "ngx_http_lua_run_thread",
    "ngx_dyups::binding::api_reply",
    "ngx_dyups::binding::send_api",
    "ngx_dyups::binding::after_write",
    "ngx_dyups::binding::with_snapshot",
    "ngx_dyups::admin::rest::handle",
    "ngx_dyups::store::StateFile::write_with",
    "ngx_dyups::store::StateFile::read_unless",
    "ngx_dyups::store::codec::encode",
    "ngx_dyups::store::codec::decode",
    "ngx_dyups::store::copy_file::CopyFile::save",
    "ngx_dyups::balance::worker::Worker::refresh",
    "ngx_http_lua_ffi_run_worker_thread",
    "ngx_http_lua_thread_event_handler",
]


def proxy_files(n, backends):
    four = " ".join(db.srv(b) for b in backends[:4])
    return {"conf/upstream.conf": "".join(f"upstream u{i} {{ {four} }}\n" for i in range(n))}


def with_so(body, libdir, floor=None):
    """The proxy configuration loading ngx.dyups from `libdir`/ngx/dyups.so;
    with `floor`, its admin port's `GET /list` answered by nginx alone
    ("nginx": `return 200`) or by a Lua content handler that only prints
    ("lua"): what any admin request costs, whatever ngx.dyups does."""
    body = body.replace(f'"{db.REPO}/lib/?.so;;"', f'"{libdir}/?.so;;"', 1)
    api = f"location / {{ content_by_lua_file {db.REPO}/lua/dyups_api.lua; }}"
    assert api in body
    if floor == "nginx":
        body = body.replace(api, 'location = /list { return 200 "c1\\nu0\\n"; }', 1)
    elif floor == "lua":
        body = body.replace(api, 'location = /list { content_by_lua_block { ngx.print("c1\\nu0\\n") } }', 1)
    return body


def task_cpu(pid):
    """(CPU ns, user ticks, system ticks, minor faults, bytes it made dirty
    for the disk) of process `pid`, all its threads."""
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        except (OSError, ValueError):
            pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # minflt is field 10, utime 14, stime 15 (1-based, from pid): here 7, 11, 12.
    written = 0
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                written = int(line.split()[1])
    return ns, int(fields[11]), int(fields[12]), int(fields[7]), written


def cpu_mode(cfg, root, backends):
    sos = cfg.so.split(",")
    tick = os.sysconf("SC_CLK_TCK")
    others = [f"u{i}" for i in range(1, cfg.n)] or ["c1"]
    insts = []
    for i, so in enumerate(sos):
        libdir = os.path.join(root, f"lib{i}")
        os.makedirs(os.path.join(libdir, "ngx"))
        shutil.copy(so, os.path.join(libdir, "ngx", "dyups.so"))
        port, api = db.free_port(), db.free_port()
        body = with_so(db.dyups_conf(port, api, size="16m", extra_init=cfg.init), libdir, cfg.floor)
        inst = db.Nginx(root, f"p{i}", 2, body, files=proxy_files(cfg.n, backends), main=db.DYUPS_MAIN)
        inst.start([port, api], timeout=120)
        insts.append((so, inst, api, inst.worker_pids()))
    # The JIT compiles, pools fill, the file's pages are all touched once.
    for _, _, api, _ in insts:
        db.writer_finish(db.writer_bg(api, cfg.rate, 1, others, backends[:4], read=cfg.read))
    rows = {so: [] for so in sos}
    for rnd in range(cfg.rounds):
        for so, inst, api, workers in insts:
            before = [task_cpu(w) for w in workers]
            load = os.getloadavg()[0]
            wr = db.writer_finish(db.writer_bg(api, cfg.rate, cfg.secs, others, backends[:4],
                                               read=cfg.read))
            after = [task_cpu(w) for w in workers]
            n = max(1.0, wr["ok"] + wr["failed"])
            d = [sum(a[k] - b[k] for a, b in zip(after, before)) for k in range(5)]
            row = {"us": d[0] / 1e3 / n, "user_us": d[1] / tick * 1e6 / n,
                   "sys_us": d[2] / tick * 1e6 / n, "faults": d[3] / n, "kib": d[4] / 1024 / n,
                   "rate": wr["ok"] / wr["secs"], "failed": wr["failed"], "load": load}
            rows[so].append(row)
            db.log(f"  round {rnd + 1} {so}: {row['us']:.0f} µs/{'read' if cfg.read else 'write'} "
                   f"(user {row['user_us']:.0f}, sys {row['sys_us']:.0f}, {row['faults']:.2f} faults, "
                   f"{row['kib']:.0f} KiB dirtied) "
                   f"at {row['rate']:.0f}/s, load {load:.1f}")
    what = "read (GET /list)" if cfg.read else "write"
    if cfg.floor:
        what += f" answered by {'return 200' if cfg.floor == 'nginx' else 'content_by_lua_block'}"
    print(f"CPU of both workers per {what}, N = {cfg.n}, {cfg.rate}/s for {cfg.secs} s, "
          f"median of {cfg.rounds} rounds{', init ' + cfg.init.strip() if cfg.init else ''}:")
    for so in sos:
        r = rows[so]
        each = " ".join(f"{x['us']:.0f}" for x in r)
        print(f"  {so}: {db.med([x['us'] for x in r]):.0f} µs (user {db.med([x['user_us'] for x in r]):.0f}, "
              f"sys {db.med([x['sys_us'] for x in r]):.0f}, {db.med([x['faults'] for x in r]):.2f} minor "
              f"faults, {db.med([x['kib'] for x in r]):.0f} KiB dirtied for the disk), at {db.med([x['rate'] for x in r]):.0f}/s, {sum(x['failed'] for x in r):.0f} failed; "
              f"rounds: {each}")


def callgrind_mode(cfg, root, backends):
    if not shutil.which("valgrind"):
        sys.exit("valgrind not found: apt-get install -y valgrind")
    so = cfg.so.split(",")[0]
    libdir = os.path.join(root, "lib0")
    os.makedirs(os.path.join(libdir, "ngx"))
    shutil.copy(so, os.path.join(libdir, "ngx", "dyups.so"))
    others = [f"u{i}" for i in range(1, cfg.n)] or ["c1"]

    def run(name, secs):
        """One nginx under callgrind: a warm-up, then writes for `secs`, or
        (secs None) idle for `idle`; stopped, each worker's whole-run counts."""
        port, api = db.free_port(), db.free_port()
        body = with_so(db.dyups_conf(port, api, size="16m", extra_init=cfg.init), libdir)
        prefix = os.path.join(root, name)
        for d in ("conf", "logs", "tmp"):  # not state/: see dyups_bench.Nginx
            os.makedirs(os.path.join(prefix, d), exist_ok=True)
        os.chmod(prefix, 0o755)
        for rel, text in proxy_files(cfg.n, backends).items():
            with open(os.path.join(prefix, rel), "w") as f:
                f.write(text)
        # The workers run as nginx's default user, not as the master's root.
        dumps = os.path.join(prefix, "dumps")
        os.makedirs(dumps)
        os.chmod(dumps, 0o777)
        conf = os.path.join(prefix, "conf", "nginx.conf")
        with open(conf, "w") as f:
            f.write(db.preamble(2).replace("daemon on;", "daemon off;") + db.DYUPS_MAIN
                    + "http {\n" + db.HTTP_COMMON + body + "\n}\n")
        p = subprocess.Popen(["valgrind", "--tool=callgrind",
                              f"--callgrind-out-file={dumps}/callgrind.out.%p",
                              db.NGINX, "-p", prefix + "/", "-c", conf],
                             stdin=subprocess.DEVNULL,
                             stdout=open(os.path.join(prefix, "logs", "vg.log"), "w"),
                             stderr=subprocess.STDOUT, env=db.NGINX_ENV)
        try:
            deadline = time.monotonic() + 180
            workers = []
            while len(workers) < 2 or not (db.port_open(port) and db.port_open(api)):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx under callgrind did not start; see {prefix}/logs")
                time.sleep(0.5)
                workers = children(p.pid)
            # One writer, so one connection and one worker, for the warm-up
            # and the writes counted: the idle run's writer stops after
            # the warm-up, and the run waits as long as the busy one wrote.
            t0 = time.monotonic()
            wr = db.writer_finish(db.writer_bg(api, cfg.rate, cfg.warm + (secs or 0), others, backends[:4],
                                               read=cfg.read))
            if secs is None:
                time.sleep(max(0.0, cfg.idle - (time.monotonic() - t0)))
            took = time.monotonic() - t0
        finally:
            p.terminate()
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        counts = {w: cg.parse(os.path.join(dumps, f"callgrind.out.{w}")) for w in workers}
        return counts, wr, took

    busy, wr, took = run("busy", cfg.secs)
    cfg.idle = took
    idle, warm, _ = run("idle", None)
    n = max(1.0, wr["ok"] + wr["failed"] - warm["ok"] - warm["failed"])
    secs = took - cfg.warm

    def handled(counts):
        return sum(c for k, c in counts[2].items() if k.endswith("ngx_http_lua_content_handler"))

    # Workers of the two runs paired: the one that served the writer's
    # connection with the one of the idle run that served it.
    bw = sorted(busy, key=lambda w: -handled(busy[w]))
    iw = sorted(idle, key=lambda w: -handled(idle[w]))
    what = "read (GET /list)" if cfg.read else "write"
    print(f"callgrind, instructions per {what} ({n:.0f} in {secs:.1f} s after {cfg.warm:.0f} s of warm-up, "
          f"N = {cfg.n}, a run with the warm-up alone subtracted){', init ' + cfg.init.strip() if cfg.init else ''}; "
          f"{so}")
    for label, b, i in [("serving worker", bw[0], iw[0]), ("other worker", bw[1], iw[1])]:
        (bt, bo, bi, _), (it, io, ii, _) = busy[b], idle[i]
        by = dict.fromkeys(cg.GROUPS, 0)
        for obj, c in bo.items():
            by[cg.group(obj)] += c
        for obj, c in io.items():
            by[cg.group(obj)] -= c
        print(f"  {label}: {(bt - it) / n:.0f} (" + ", ".join(f"{g} {by[g] / n:.0f}" for g in cg.GROUPS) + ")")
        shown = []
        for fn in DETAIL:
            short = fn.split("::")[-1]
            hits = [k for k in bi if k == fn or k.startswith(fn + "'") or k.startswith(fn + "<")
                    or k == fn + "::h" or (fn in k and k.split("::")[-1].split("<")[0] in (short,)
                                          and "closure" not in k)]
            c = sum(bi[k] - ii.get(k, 0) for k in hits)
            if c > 0:
                shown.append(f"{fn.split('::', 1)[-1]} {c / n:.0f}")
        if shown:
            print("    " + ", ".join(shown))
    if cfg.keep:
        print(f"kept {root}", file=sys.stderr)


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            fields = st[st.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return sorted(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--so", default=os.path.join(db.REPO, "lib", "ngx", "dyups.so"),
                    help="builds of ngx.dyups to compare, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--rate", type=int, default=400)
    ap.add_argument("--n", type=int, default=1, help="upstreams in the table")
    ap.add_argument("--read", action="store_true", help="GET /list instead of writes")
    ap.add_argument("--init", default="", help="extra init options, e.g. 'durable = false,'")
    ap.add_argument("--floor", choices=["nginx", "lua"],
                    help="with --read: GET /list answered by nginx's return, or a Lua block that prints")
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--warm", type=float, default=5, help="callgrind mode: seconds of writes first")
    ap.add_argument("--keep", action="store_true", help="keep the prefixes (and dumps)")
    cfg = ap.parse_args()
    if cfg.callgrind and cfg.rate == 400:
        cfg.rate = 20  # valgrind runs nginx some 50 times slower
    root = tempfile.mkdtemp(prefix="ngx-dyups-wc.")
    os.chmod(root, 0o755)
    try:
        backends = [db.free_port() for _ in range(4)]
        db.Nginx(root, "backends", 1, db.backends_conf(backends), lua=False).start(backends)
        (callgrind_mode if cfg.callgrind else cpu_mode)(cfg, root, backends)
    finally:
        db.stop_all()
        if not cfg.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
