"""bench/checks_bench.py: section 7 of `make bench`, active health checks.

N servers (1,000 and 10,000) under `check interval=1000 type=http`, spread
over upstreams of 100 servers each, on the 100 ports of one backend nginx
(the same address in two upstreams is two checked servers, each with its
own cell and its own probe). Measured on one proxy of 2 workers:

  * the workers' CPU time over an idle window with the checks, and over the
    same window with the same table minus the check lines: the difference
    is what probing costs, in % of one core and in µs a probe;
  * probes per second achieved (the backend's stub_status request count)
    against expected (N per second);
  * lateness: `late_ms` of every server on the check_status page, sampled
    during the window, its p99 (and the share of servers probed in the last
    two intervals);
  * a hot upstream's throughput (4 backends, no check line) with and
    without the checks running, interleaved rounds, the median of the
    per-round ratios (target >= 0.97).

The checks go on and off by rewriting the checked upstreams (the same
servers, with and without the check line): their cells, and so their
verdicts, stay.

Called by dyups_bench.py with itself as `h` (its helpers, its list of
started nginx instances that it stops on every exit).
"""

import json
import os

INTERVAL_MS = 1000
PER_UPSTREAM = 100
CHECK = "check interval=1000 type=http default_down=false;"
# The keep-alive variant: one connection carries 1,000 probes (HTTP/1.1).
KEEPALIVE = ('check_keepalive_requests 1000; '
             'check_http_send "GET / HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n";')


def backend_conf(ports, stub_port):
    listens = "\n".join(f"        listen 127.0.0.1:{p} backlog=4096;" for p in ports)
    return f"""
    server {{
{listens}
        location / {{ return 200 "ok\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{stub_port};
        location = /stub {{ stub_status; }}
    }}
"""


def stub_requests(h, port):
    """The backend's request count so far (stub_status), this read included."""
    _, _, body = h.raw_get(port, "/stub")
    # "Active connections: 1 \nserver accepts handled requests\n 10 10 12 \n..."
    return int(body.decode().split("\n")[2].split()[2])


def checked_body(ports, checks, keepalive=False):
    body = " ".join(f"server 127.0.0.1:{p};" for p in ports)
    if checks:
        body += " " + CHECK + (" " + KEEPALIVE if keepalive else "")
    return body


def set_checks(h, api, names, ports, checks, keepalive):
    for name in names:
        st, body = api.call("POST", f"/upstream/{name}", checked_body(ports, checks, keepalive))
        if st != 200:
            raise RuntimeError(f"checks: POST /upstream/{name} answered {st}: {body!r}")


def status_rows(h, port):
    _, _, body = h.raw_get(port, "/status?format=json", timeout=30)
    return json.loads(body)["servers"]


def workers_cpu(h, workers):
    return sum(h.cpu_ns(w) for w in workers) / 1e9


def host_busy_s():
    """CPU seconds every CPU of the host spent busy so far (/proc/stat):
    everything, other users' load included."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle, iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def idle_window(h, cfg, inst_workers, be_workers, stub_port):
    """CPU seconds of the proxy's workers, of the probed backend, of the
    whole host, and probes counted at the backend, over one idle window of
    cfg.check_secs (nothing else asked of the proxy)."""
    cpu0, be0, host0 = workers_cpu(h, inst_workers), workers_cpu(h, be_workers), host_busy_s()
    req0, t0 = stub_requests(h, stub_port), h.now()
    h.time.sleep(cfg.check_secs)
    secs = h.now() - t0
    cpu = workers_cpu(h, inst_workers) - cpu0
    be = workers_cpu(h, be_workers) - be0
    host = host_busy_s() - host0
    # the closing stub read is a backend request too
    probes = stub_requests(h, stub_port) - req0 - 1
    return {"secs": secs, "cpu_s": cpu, "be_s": be, "host_s": host, "probes": probes}


def lateness(h, status_port, samples=3):
    """Every server's last `late_ms`, read `samples` times a second apart,
    and the least share of servers probed within two intervals of the
    newest probe."""
    late, fresh = [], []
    for _ in range(samples):
        h.time.sleep(1)
        s = status_rows(h, status_port)
        at = max(r.get("checked_at_ms", 0) for r in s["server"])
        late += [r.get("late_ms", 0) for r in s["server"]]
        fresh.append(sum(1 for r in s["server"]
                         if at - r.get("checked_at_ms", 0) <= 2 * INTERVAL_MS) / len(s["server"]))
    return late, fresh


def section_checks(h, cfg, root, backends, res):
    out = []
    ports = [h.free_port() for _ in range(PER_UPSTREAM)]
    stub_port = h.free_port()
    be = h.Nginx(root, "check-backends", 1, backend_conf(ports, stub_port), lua=False)
    be.start(ports[:1] + [stub_port])
    be_workers = be.worker_pids()
    hot = " ".join(h.srv(b) for b in backends[:4])
    for n, keepalive in cfg.check_runs:
        names = [f"c{i}" for i in range(n // PER_UPSTREAM)]
        port, api_port, status_port = h.free_port(), h.free_port(), h.free_port()
        text = f"upstream hot {{ {hot} }}\n" + "".join(
            f"upstream {name} {{ {checked_body(ports, True, keepalive)} }}\n" for name in names)
        conf = h.dyups_conf(port, api_port, size="16m") + f"""
    server {{
        listen 127.0.0.1:{status_port};
        location = /status {{ content_by_lua_file {h.REPO}/lua/check_status.lua; }}
    }}
"""
        inst = h.Nginx(root, f"p-checks-{n}{'k' if keepalive else ''}", 2, conf, files={"conf/upstream.conf": text},
                       main=h.DYUPS_MAIN)
        inst.start([port, api_port, status_port], timeout=120)
        workers = inst.worker_pids()
        api = h.Api(api_port)
        st, _, _ = h.raw_get(port, "/host", "hot")
        if st != 200:
            raise RuntimeError(f"checks {n}: hot answered {st}")
        # every server probed at least once, then steady
        h.time.sleep(3)
        on = idle_window(h, cfg, workers, be_workers, stub_port)
        late, fresh = lateness(h, status_port)
        down = status_rows(h, status_port)["down"]
        set_checks(h, api, names, ports, False, keepalive)
        h.time.sleep(1)
        off = idle_window(h, cfg, workers, be_workers, stub_port)
        # hot upstream's throughput, checks on and off, interleaved; the
        # order alternates (on, off | off, on | ...) so that a drift of the
        # host's speed over the run does not favour either
        runs = {True: [], False: []}
        state = False
        for i in range(cfg.check_rounds):
            for checks in ((True, False) if i % 2 == 0 else (False, True)):
                if checks != state:
                    set_checks(h, api, names, ports, checks, keepalive)
                    state = checks
                    h.time.sleep(cfg.check_settle)
                runs[checks].append(h.wrk(port, "/host", cfg.secs, cfg.conns, cfg.threads, host="hot"))
        with_rps = [r["rps"] for r in runs[True]]
        without_rps = [r["rps"] for r in runs[False]]
        row = {
            "n": n,
            "keepalive": keepalive,
            "expected_per_s": n * 1000 / INTERVAL_MS,
            "probes_per_s": on["probes"] / on["secs"],
            "idle_probes_per_s_off": off["probes"] / off["secs"],
            "cpu_on_pct": on["cpu_s"] / on["secs"] * 100,
            "cpu_off_pct": off["cpu_s"] / off["secs"] * 100,
            "backend_pct": (on["be_s"] / on["secs"] - off["be_s"] / off["secs"]) * 100,
            "host_pct": (on["host_s"] / on["secs"] - off["host_s"] / off["secs"]) * 100,
            "late_p50": h.pct(late, 50),
            "late_p99": h.pct(late, 99),
            "late_max": max(late, default=0),
            "fresh_min": min(fresh, default=0),
            "down": down,
            "rps_with": h.med(with_rps),
            "rps_without": h.med(without_rps),
            "rps_with_all": with_rps,
            "rps_without_all": without_rps,
            "ratio_paired": h.med([a / b for a, b in zip(with_rps, without_rps)]),
            "errors": sum(r["non2xx"] + r["sockerr"] for r in runs[True] + runs[False]),
            "log_errors": inst.count_errors(),
        }
        row["probing_pct"] = row["cpu_on_pct"] - row["cpu_off_pct"]
        # What the hot upstream can keep at most, when the checks' CPU comes
        # out of the CPUs its requests run on: everything they cost the host
        # (the workers, the probed backend, the kernel's work for both ends),
        # and the workers' share alone (a host whose backends are elsewhere).
        cpus = os.cpu_count() or 1
        row["bound_host"] = 1 - max(row["host_pct"], 0) / 100 / cpus
        row["bound_ours"] = 1 - max(row["probing_pct"], 0) / 100 / cpus
        row["us_per_probe"] = (row["probing_pct"] / 100 * 1e6 / row["probes_per_s"]
                               if row["probes_per_s"] else float("nan"))
        h.log(f"  [6] N={label(row)}: {row['probes_per_s']:.0f} probes/s of {row['expected_per_s']:.0f}, "
              f"workers {row['cpu_on_pct']:.1f} % of a core with checks, {row['cpu_off_pct']:.1f} % without, "
              f"late p99 {row['late_p99']} ms, hot {row['rps_with']:.0f} vs {row['rps_without']:.0f} req/s "
              f"(paired {row['ratio_paired']:.3f})")
        inst.stop()
        out.append(row)
    be.stop()
    res["checks"] = out


def label(r):
    return f"{r['n']}{' ka' if r['keepalive'] else ''}"


def report(cfg, res, p):
    """Section 7's table, printed by dyups_bench.report with the others."""
    ck = res.get("checks")
    if not ck:
        return
    p()
    p(f"7. Active health checks: `{CHECK}` on N servers ({PER_UPSTREAM} per upstream, the same "
      f"{PER_UPSTREAM} backend ports), 2 proxy workers, 1 backend worker; \"ka\": with `{KEEPALIVE}`; "
      f"idle windows of {cfg.check_secs} s, then 3 reads of the status page for lateness; hot upstream "
      f"(4 backends, unchecked) {cfg.check_rounds} interleaved rounds x {cfg.secs} s, checks on / off")
    p(f"   {'N':>8s} {'probes/s':>9s} {'expected':>9s} {'CPU on':>7s} {'off':>5s} {'probing':>8s} "
      f"{'us/probe':>9s} {'backend':>8s} {'host':>7s} {'late p50':>9s} {'p99':>6s} {'max':>6s} "
      f"{'fresh':>6s} {'hot on':>8s} {'hot off':>8s} {'ratio':>6s} {'bound':>6s} {'ours':>6s}")
    for r in ck:
        p(f"   {label(r):>8s} {r['probes_per_s']:9.0f} {r['expected_per_s']:9.0f} {r['cpu_on_pct']:6.1f}% "
          f"{r['cpu_off_pct']:4.1f}% {r['probing_pct']:7.1f}% {r['us_per_probe']:9.1f} "
          f"{r['backend_pct']:7.1f}% {r['host_pct']:6.1f}% "
          f"{r['late_p50']:9d} {r['late_p99']:6d} {r['late_max']:6d} {r['fresh_min'] * 100:5.0f}% "
          f"{r['rps_with']:8.0f} {r['rps_without']:8.0f} {r['ratio_paired']:6.3f} "
          f"{r['bound_host']:6.3f} {r['bound_ours']:6.3f}")
        p("            hot req/s per round, on: " + " ".join(f"{x:.0f}" for x in r["rps_with_all"])
          + "; off: " + " ".join(f"{x:.0f}" for x in r["rps_without_all"])
          + f"; servers down: {r['down']}; failed requests {r['errors']}; error-log lines {r['log_errors']}")
    p("   (CPU on/off: both proxy workers' CPU time over the window, % of one core; probing: on minus off, "
      "and per probe; backend, host: the probed backend's and the whole host's CPU, on minus off (the host's "
      "includes the kernel's softirq work and other users' load); late: ms a probe started after it was "
      "due, every server's last probe, 3 samples 1 s apart; fresh: the least share of servers probed "
      "within two intervals of the newest probe; ratio: hot req/s with checks / without, median of the "
      "per-round ratios; bound: 1 - host / CPUs, the ratio left when all the checks' CPU on this host comes "
      "out of the hot upstream's; ours: 1 - probing / CPUs, the workers' share alone, as on a host whose "
      "probed backends are elsewhere)")


def targets(res, target):
    """Section 7's rows of the targets table."""
    for r in res.get("checks") or []:
        target(f"{label(r)} checked servers: hot upstream >= 0.97 x req/s without checks (paired)", 1,
               r["ratio_paired"] >= 0.97, f"{r['ratio_paired']:.3f}")
        target(f"{label(r)} checked servers: probes/s >= 0.95 x expected", 1,
               r["probes_per_s"] >= 0.95 * r["expected_per_s"],
               f"{r['probes_per_s']:.0f} of {r['expected_per_s']:.0f}")
