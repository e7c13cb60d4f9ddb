//! What each server is doing now, as `/metrics` and `/dashboard` show it:
//! its state in NGINX Plus's terms, read once from the table and its cell
//! in the zone (connections, the passive failures of its window, the
//! active-check verdict and last probe, the counters of
//! [`crate::store::stats`]), so that the two views agree. The state is
//! [`state_of`]'s, the one mapping the REST JSON's `state` word is made by
//! too: a test below holds the word and the metric's code together for
//! every kind of server.

use crate::health::{last_probe, verdict, LastProbe, Verdict};
use crate::store::stats::{counters_of, state_of, Counters};
use crate::store::zone::{PeerCell, Zone};
use crate::table::model::{ServerSpec, Table, Upstream};

/// A server's state, with the codes of nginx-prometheus-exporter's
/// `nginxplus_upstream_server_state` (1 up, 2 draining, 3 down, 4 unavail,
/// 5 checking, 6 unhealthy), so dashboards made for it read ours: the one
/// mapping of the store's, which the REST JSON uses too.
pub use crate::store::stats::ServerState;

/// One server of one upstream, as read at one instant.
#[derive(Clone, Copy, Debug)]
pub struct ServerView<'a> {
    pub upstream: &'a Upstream,
    pub spec: &'a ServerSpec,
    pub state: ServerState,
    /// Whether it has a cell in the zone. Without one (the zone was full)
    /// each worker counts for itself, and `active` and `fails` are 0 here.
    pub shared: bool,
    /// Connections in flight in the whole nginx.
    pub active: u32,
    /// Passive failures in the current `fail_timeout` window.
    pub fails: u32,
    /// The active-check verdict, for an upstream with a `check` line.
    pub verdict: Option<Verdict>,
    pub last_probe: Option<LastProbe>,
    /// What it has done (zero without a cell: nothing is counted for it).
    pub counters: Counters,
}

/// Every server of `table`, in table order, read from `zone` at `now_ms`
/// (Unix ms: the passive failure window is timed against it).
pub fn servers<'a>(table: &'a Table, zone: Zone<'a>, now_ms: u64) -> Vec<ServerView<'a>> {
    let total = table.upstreams.iter().map(|u| u.servers.len()).sum();
    let mut out = Vec::with_capacity(total);
    for u in &table.upstreams {
        let checks = u.check.line.is_some();
        for (i, spec) in u.servers.iter().enumerate() {
            let r = u.peer(i);
            let cell = zone.cell(r);
            let v = cell.filter(|_| checks).and_then(|c| verdict(c, r.tag));
            out.push(ServerView {
                upstream: u,
                spec,
                state: state_of(zone, u, i, now_ms),
                shared: cell.is_some(),
                active: cell.map_or(0, PeerCell::conns),
                fails: cell.map_or(0, PeerCell::fails),
                verdict: v,
                last_probe: cell.filter(|_| checks).and_then(last_probe),
                counters: counters_of(zone, u, i, now_ms),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::store::zone::{HEALTH_CHECKING, HEALTH_DOWN};
    use crate::testing::TempDir;

    /// Whose the health word of `cell` is.
    fn health_tag(cell: &PeerCell) -> u32 {
        (cell.health_word().load(Ordering::Acquire) >> 32) as u32
    }

    const NOW: u64 = 1_800_000_000_000;

    fn states(store: &crate::store::StateFile) -> Vec<(String, &'static str)> {
        let snap = store.read().unwrap();
        servers(&snap.table, store.zone(), NOW)
            .iter()
            .map(|s| (s.spec.addr.to_string(), s.state.word()))
            .collect()
    }

    #[test]
    fn each_state_comes_from_what_decides_it() {
        let dir = TempDir::new();
        let store = dir.store(&[
            (
                "plain",
                "server 127.0.0.1:1; server 127.0.0.1:2 down; server 127.0.0.1:3 max_fails=2;",
            ),
            (
                "checked",
                "check interval=1000 type=tcp; server 127.0.0.1:4; server 127.0.0.1:5; server 127.0.0.1:6;",
            ),
        ]);
        let snap = store.read().unwrap();
        let zone = store.zone();
        let cell_of = |name: &str, i: usize| {
            let up = snap
                .table
                .upstreams
                .iter()
                .find(|u| u.name == name)
                .unwrap();
            (zone.cell(up.peer(i)).unwrap(), up.peer(i).tag)
        };
        // 127.0.0.1:3 reached max_fails=2 just now: unavail for its window.
        let (c3, t3) = cell_of("plain", 2);
        assert!(c3.add_failure(t3, NOW - 1000));
        assert!(c3.add_failure(t3, NOW - 1000));
        // 127.0.0.1:5 failed its checks; :6 is still checking (default_down).
        let (c5, t5) = cell_of("checked", 1);
        assert_eq!(health_tag(c5), t5);
        c5.health_word()
            .store(u64::from(t5) << 32 | HEALTH_DOWN, Ordering::Release);
        let (c4, t4) = cell_of("checked", 0);
        c4.health_word()
            .store(u64::from(t4) << 32, Ordering::Release);
        let (c6, t6) = cell_of("checked", 2);
        c6.health_word()
            .store(u64::from(t6) << 32 | HEALTH_CHECKING, Ordering::Release);
        let mut got = states(&store);
        got.sort();
        assert_eq!(
            got,
            [
                ("127.0.0.1:1".to_string(), "up"),
                ("127.0.0.1:2".to_string(), "down"),
                ("127.0.0.1:3".to_string(), "unavail"),
                ("127.0.0.1:4".to_string(), "up"),
                ("127.0.0.1:5".to_string(), "unhealthy"),
                ("127.0.0.1:6".to_string(), "checking"),
            ]
        );
        // Its window over, the failing server is up again.
        let snap = store.read().unwrap();
        let later = servers(&snap.table, store.zone(), NOW + 11_000);
        let s3 = later.iter().find(|s| s.spec.addr.port() == 3).unwrap();
        assert_eq!(s3.state, ServerState::Up);
        assert_eq!(s3.fails, 2);
    }

    #[test]
    fn codes_are_nginx_plus_codes() {
        let all = [
            ServerState::Up,
            ServerState::Draining,
            ServerState::Down,
            ServerState::Unavail,
            ServerState::Checking,
            ServerState::Unhealthy,
        ];
        let codes: Vec<u8> = all.iter().map(|s| s.code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6]);
    }

    /// Every `dyups_upstream_server_state{upstream,server} CODE` of `text`.
    fn metric_codes(text: &str) -> Vec<((String, String), u8)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("dyups_upstream_server_state{upstream=\""))
            .map(|rest| {
                let (upstream, rest) = rest.split_once("\",server=\"").unwrap();
                let (server, code) = rest.rsplit_once("\"} ").unwrap();
                (
                    (upstream.to_owned(), server.to_owned()),
                    code.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_json_state_word_and_the_metric_code_agree_for_every_kind_of_server() {
        use crate::admin::rest::{handle, Preconditions, Request};
        use crate::admin::{prometheus, rest};
        let dir = TempDir::new();
        let store = dir.store(&[
            (
                "plain",
                "server 127.0.0.1:1; server 127.0.0.1:2 down; server 127.0.0.1:3 max_fails=1; \
                 server 127.0.0.1:4 down;",
            ),
            (
                "checked",
                "check interval=1000 type=tcp; server 127.0.0.1:5; server 127.0.0.1:6; server 127.0.0.1:7;",
            ),
            // A lone server is never unavail, whatever its failures.
            ("lone", "server 127.0.0.1:8 max_fails=1;"),
        ]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let snap = store.read().unwrap();
        let zone = store.zone();
        let peer = |name: &str, i: usize| {
            let u = snap.table.get(name).unwrap();
            (zone.cell(u.peer(i)).unwrap(), u.peer(i).tag)
        };
        let (c, t) = peer("plain", 2);
        assert!(c.add_failure(t, now));
        // Marked down with a connection in flight: draining.
        let (c, t) = peer("plain", 3);
        assert!(c.acquire(t));
        let (c, t) = peer("checked", 0);
        c.health_word().store(u64::from(t) << 32, Ordering::Release);
        let (c, t) = peer("checked", 1);
        c.health_word()
            .store(u64::from(t) << 32 | HEALTH_DOWN, Ordering::Release);
        let (c, t) = peer("checked", 2);
        c.health_word()
            .store(u64::from(t) << 32 | HEALTH_CHECKING, Ordering::Release);
        let (c, t) = peer("lone", 0);
        assert!(c.add_failure(t, now));

        // The REST JSON, as a client reads it.
        let req = Request {
            method: "GET",
            path: "/detail",
            body: b"",
            json: true,
            preconditions: Preconditions::default(),
            answers: None,
            name_status: &[],
        };
        let r: rest::Response = handle(&req, &store, &snap, &Default::default());
        assert_eq!(r.status, 200, "{r:?}");
        let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let mut words = std::collections::BTreeMap::new();
        for u in doc["upstreams"].as_array().unwrap() {
            for s in u["servers"].as_array().unwrap() {
                let key = (
                    u["name"].as_str().unwrap().to_owned(),
                    s["addr"].as_str().unwrap().to_owned(),
                );
                words.insert(key, s["state"].as_str().unwrap().to_owned());
            }
        }
        // /metrics, its codes named as the README's table names them.
        let views = servers(&snap.table, zone, now);
        let text = prometheus::render(&prometheus::Scrape {
            servers: &views,
            upstreams: snap.table.upstreams.len(),
            workers: &[],
            table: &store.table_stats(&snap),
            names: &[],
        });
        let named = ["up", "draining", "down", "unavail", "checking", "unhealthy"];
        let codes: std::collections::BTreeMap<_, _> = metric_codes(&text)
            .into_iter()
            .map(|(k, code)| (k, named[usize::from(code) - 1].to_owned()))
            .collect();
        assert_eq!(codes, words, "/metrics:\n{text}\nJSON: {}", r.body);
        let mut kinds: Vec<&str> = words.values().map(String::as_str).collect();
        kinds.sort();
        kinds.dedup();
        let mut all = named.to_vec();
        all.sort();
        assert_eq!(kinds, all, "not every kind of server was shown");
        assert_eq!(words[&("lone".into(), "127.0.0.1:8".into())], "up");
        assert_eq!(words[&("plain".into(), "127.0.0.1:4".into())], "draining");
    }
}
