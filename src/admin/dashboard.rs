//! `/dashboard`: a status page for people, one self-contained HTML page
//! (`dashboard.html`, compiled in: no asset from outside the host) that
//! fetches its own path with `?format=json` every second and redraws.
//! The JSON is made here, from the same [`ServerView`]s as `/metrics`.
//!
//! The page has a JSON of its own rather than fetching `/detail?format=json`
//! and `/workers`: one request a refresh is one read of one snapshot, so the
//! version, each worker's generation and every server's state and counters
//! are of the same instant (two fetches are two instants, and the version
//! of one need not be the table of the other); and it holds only what the
//! page draws (1.4 MB for 10,000 servers where `/detail` would be several
//! times that). The facts are not duplicated: the state is
//! [`crate::store::stats::state_of`]'s and the counters the store's, as in
//! the REST JSON and `/metrics`.

use serde_json::{json, Value};

use super::name_status::NameReport;
use super::server_state::ServerView;
use crate::store::stats::WorkerStats;

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

/// The page's `Content-Security-Policy`: its own inline script and style,
/// fetches to this origin only, nothing else loaded from anywhere.
pub const CSP: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'";

/// What the page draws: the table version, each worker's generation, and
/// every upstream with its servers and its `server NAME` lines (what the
/// resolver last found for each), as read at `now_ms` (Unix ms).
pub fn json(
    version: u64,
    servers: &[ServerView],
    names: &[NameReport],
    workers: &[WorkerStats],
    now_ms: u64,
) -> String {
    let mut upstreams: Vec<Value> = Vec::new();
    let mut last: Option<&str> = None;
    for v in servers {
        if last != Some(v.upstream.name.as_str()) {
            upstreams.push(json!({"name": v.upstream.name, "servers": [], "names": []}));
            last = Some(&v.upstream.name);
        }
        let health = v.upstream.check.line.as_ref().map(|_| {
            let mut h = json!({
                "rise": v.verdict.map_or(0, |x| x.passes),
                "fall": v.verdict.map_or(0, |x| x.failures),
            });
            if let Some(p) = v.last_probe {
                h["result"] = json!(if p.status != 0 {
                    p.status.to_string()
                } else {
                    p.outcome.name().to_owned()
                });
                h["passed"] = json!(p.outcome == crate::health::Outcome::Passed);
                h["latency_ms"] = json!(p.latency_ms);
                h["checked_at_ms"] = json!(p.at_ms);
            }
            h
        });
        let server = json!({
            "server": v.spec.addr,
            "state": v.state.word(),
            "state_code": v.state.code(),
            "weight": v.spec.weight,
            "backup": v.spec.backup,
            "max_conns": v.spec.max_conns,
            "shared": v.shared,
            "active": v.active,
            "fails": v.fails,
            // Counters: null without a cell, where nothing is counted.
            "requests": v.shared.then_some(v.counters.requests),
            "fails_total": v.shared.then_some(v.counters.fails),
            "health": health,
        });
        if let Some(Value::Array(list)) = upstreams.last_mut().and_then(|u| u.get_mut("servers")) {
            list.push(server);
        }
    }
    // A name line belongs to its upstream's entry; an upstream whose names
    // have no address yet has no server either, and gets an entry here.
    for n in names {
        let entry = upstreams
            .iter()
            .position(|u| u["name"] == n.upstream.as_str());
        let entry = entry.unwrap_or_else(|| {
            upstreams.push(json!({"name": n.upstream, "servers": [], "names": []}));
            upstreams.len() - 1
        });
        if let Some(Value::Array(list)) = upstreams[entry].get_mut("names") {
            list.push(json!({
                "name": n.name,
                "service": n.service,
                "resolve": n.resolve,
                "addresses": n.addresses,
                "resolved_ms": n.resolved_ms,
                "error": n.error,
                "failures": n.failures,
            }));
        }
    }
    let workers: Vec<Value> = workers
        .iter()
        .map(|w| json!({"pid": w.pid, "generation": w.generation, "requests": w.requests}))
        .collect();
    json!({
        "version": version,
        "now_ms": now_ms,
        "workers": workers,
        "upstreams": upstreams,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::server_state::servers;
    use crate::testing::TempDir;

    #[test]
    fn servers_are_listed_under_their_upstream_with_their_state() {
        let dir = TempDir::new();
        let store = dir.store(&[
            ("a", "server 127.0.0.1:1 weight=4; server 127.0.0.1:2 down;"),
            ("b", "check interval=1000 type=tcp; server 127.0.0.1:3;"),
        ]);
        let snap = store.read().unwrap();
        let a0 = store.zone().cell(snap.table.upstreams[0].peer(0)).unwrap();
        a0.counters().count_request();
        a0.counters().count_request();
        a0.counters().count_failure(None, 1);
        let views = servers(&snap.table, store.zone(), 1);
        let w = [WorkerStats {
            pid: 7,
            generation: snap.version,
            requests: 9,
        }];
        let d: Value = serde_json::from_str(&json(snap.version, &views, &[], &w, 1)).unwrap();
        assert_eq!(d["version"], json!(snap.version));
        assert_eq!(
            d["workers"],
            json!([{"pid": 7, "generation": snap.version, "requests": 9}])
        );
        let a = &d["upstreams"][0];
        assert_eq!(a["name"], "a");
        assert_eq!(a["servers"][0]["server"], "127.0.0.1:1");
        assert_eq!(a["servers"][0]["state"], "up");
        assert_eq!(a["servers"][0]["weight"], 4);
        assert_eq!(a["servers"][0]["health"], Value::Null);
        assert_eq!(a["servers"][0]["requests"], 2);
        assert_eq!(a["servers"][0]["fails_total"], 1);
        assert_eq!(a["servers"][1]["requests"], 0);
        assert_eq!(a["servers"][1]["state"], "down");
        assert_eq!(a["servers"][1]["state_code"], 3);
        let b = &d["upstreams"][1];
        assert_eq!(b["servers"][0]["state"], "checking");
        assert_eq!(b["servers"][0]["health"]["rise"], 0);
        assert_eq!(d["upstreams"].as_array().unwrap().len(), 2);
        assert_eq!(a["names"], json!([]));
    }

    #[test]
    fn name_lines_are_shown_under_their_upstream_and_an_upstream_of_names_only_too() {
        let dir = TempDir::new();
        let store = dir.store(&[("a", "server 127.0.0.1:1;")]);
        let snap = store.read().unwrap();
        let views = servers(&snap.table, store.zone(), 1);
        let report = |upstream: &str, name: &str, error: Option<&str>| NameReport {
            upstream: upstream.into(),
            name: name.into(),
            service: None,
            resolve: true,
            addresses: vec!["127.0.0.2:80".into()],
            resolved_ms: 5,
            error: error.map(Into::into),
            failures: 3,
        };
        let names = [
            report("a", "app.test", None),
            report("pending", "gone.test", Some("NXDOMAIN")),
        ];
        let d: Value = serde_json::from_str(&json(snap.version, &views, &names, &[], 1)).unwrap();
        let ups = d["upstreams"].as_array().unwrap();
        assert_eq!(ups.len(), 2);
        assert_eq!(ups[0]["name"], "a");
        assert_eq!(ups[0]["servers"].as_array().unwrap().len(), 1);
        assert_eq!(ups[0]["names"][0]["name"], "app.test");
        assert_eq!(ups[0]["names"][0]["addresses"], json!(["127.0.0.2:80"]));
        assert_eq!(ups[0]["names"][0]["failures"], 3);
        assert_eq!(ups[1]["name"], "pending");
        assert_eq!(ups[1]["servers"], json!([]));
        assert_eq!(ups[1]["names"][0]["error"], "NXDOMAIN");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for outside in ["src=", "href=", "@import", "url(", "http://", "https://"] {
            assert!(!PAGE.contains(outside), "the page has {outside:?}");
        }
    }
}
