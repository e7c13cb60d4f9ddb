//! What each server is doing now, as `/metrics` and `/dashboard` show it:
//! its state in NGINX Plus's terms, read once from the table and its cell
//! in the zone (connections, the passive failures of its window, the
//! active-check verdict and last probe), so that the two views agree.

use crate::health::{last_probe, verdict, LastProbe, Verdict};
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
    /// The cell itself, for the counters read by the families that need
    /// more than the words above.
    pub cell: Option<&'a PeerCell>,
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
                state: crate::store::stats::state_of(zone, u, i, now_ms),
                shared: cell.is_some(),
                active: cell.map_or(0, PeerCell::conns),
                fails: cell.map_or(0, PeerCell::fails),
                verdict: v,
                last_probe: cell.filter(|_| checks).and_then(last_probe),
                cell,
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
}
