//! `max_conns=N`, enforced as nginx enforces it: a server with N connections
//! in flight (counted in its shared cell, so in the whole nginx) gets no new
//! request until one ends, under every balancing method; backups take over
//! when every primary is full, and with nothing left the request gets
//! "no live upstreams". Through the public API the request path uses:
//! `pick_for_request`, then `Worker::done`'s release.

use std::sync::Arc;

use ngx_dyups::balance::attempts::Attempts;
use ngx_dyups::balance::balancer::Retry;
use ngx_dyups::balance::policy::{pick_for_request, PickInput, PolicyState};
use ngx_dyups::store::zone::{PeerCell, Zone, ZoneSource};
use ngx_dyups::table::model::PeerRef;
use ngx_dyups::table::model::{Address, ServerSpec};
use ngx_dyups::table::policy::Policy;

/// A zone of `n` cells in memory, cell `i` given to server `i` under tag 1.
struct Cells(Vec<PeerCell>);

impl ZoneSource for Cells {
    fn zone(&self) -> Zone<'_> {
        Zone::new(&self.0)
    }
}

fn cells(n: usize) -> (Arc<Cells>, Vec<PeerRef>) {
    let cells: Vec<PeerCell> = (0..n).map(|_| PeerCell::default()).collect();
    for c in &cells {
        c.reset(1);
    }
    let refs = (0..n as u32)
        .map(|index| PeerRef { index, tag: 1 })
        .collect();
    (Arc::new(Cells(cells)), refs)
}

fn server(port: u16, max_conns: u32) -> ServerSpec {
    let mut s = ServerSpec::new(Address::Inet(([127, 0, 0, 1], port).into()));
    s.max_conns = max_conns;
    s
}

/// One upstream as a worker balances it, and the requests in flight.
struct Upstream {
    servers: Vec<ServerSpec>,
    state: PolicyState,
    zone: Arc<Cells>,
    attempts: Attempts,
    next_key: usize,
}

impl Upstream {
    fn new(policy: Policy, servers: Vec<ServerSpec>) -> Upstream {
        let (zone, refs) = cells(servers.len());
        let mut state = PolicyState::with_seed(policy, &servers, 7).unwrap();
        state.share(zone.clone(), &refs);
        Upstream {
            servers,
            state,
            zone,
            // Roomy: a request pushed out gives its connection back.
            attempts: Attempts::new(4096),
            next_key: 0,
        }
    }

    /// Starts a request with this hash key (`hash`) or client address
    /// (`ip_hash`): its key and the server it got, if any. Its connection
    /// stays counted until `end`.
    fn start(&mut self, hash_key: &[u8]) -> (usize, Option<usize>) {
        self.next_key += 1;
        let key = self.next_key;
        let input = PickInput {
            key: hash_key,
            client: hash_key,
        };
        let picked = pick_for_request(
            &mut self.state,
            &self.servers,
            &input,
            &mut self.attempts,
            key,
            1,
            1,
            Retry::First,
            0,
        );
        (key, picked)
    }

    /// The request's end (the log phase): its connection is given back.
    fn end(&mut self, key: usize) {
        if let Some(held) = self.attempts.finish(key).and_then(|a| a.held) {
            self.zone.zone().release(held);
        }
    }

    fn conns(&self, i: usize) -> u32 {
        self.zone.0[i].conns()
    }
}

#[test]
fn a_full_server_gets_no_new_request_until_one_ends() {
    // Round robin would alternate; A holds at most 2.
    let mut u = Upstream::new(Policy::RoundRobin, vec![server(1, 2), server(2, 0)]);
    assert!(u.state.counts_conns(), "max_conns needs the counts");
    let held: Vec<(usize, Option<usize>)> = (0..6).map(|_| u.start(b"")).collect();
    let to_a = held.iter().filter(|(_, p)| *p == Some(0)).count();
    assert_eq!(to_a, 2, "{held:?}");
    assert_eq!((u.conns(0), u.conns(1)), (2, 4));
    // Still full: the next goes to B.
    assert_eq!(u.start(b"").1, Some(1));
    // One of A's requests ends: A takes the next one.
    let a_key = held.iter().find(|(_, p)| *p == Some(0)).unwrap().0;
    u.end(a_key);
    assert_eq!(u.conns(0), 1);
    let picks: Vec<Option<usize>> = (0..3).map(|_| u.start(b"").1).collect();
    assert_eq!(
        picks.iter().filter(|p| **p == Some(0)).count(),
        1,
        "{picks:?}"
    );
    assert_eq!(u.conns(0), 2);
}

#[test]
fn without_max_conns_round_robin_counts_nothing() {
    let u = Upstream::new(Policy::RoundRobin, vec![server(1, 0), server(2, 0)]);
    assert!(!u.state.counts_conns());
}

#[test]
fn a_lone_server_at_max_conns_is_no_live_upstream_until_one_ends() {
    let mut u = Upstream::new(Policy::RoundRobin, vec![server(1, 1)]);
    let (first, picked) = u.start(b"");
    assert_eq!(picked, Some(0));
    assert_eq!(u.start(b"").1, None, "nginx: no live upstreams");
    u.end(first);
    assert_eq!(u.start(b"").1, Some(0));
}

#[test]
fn backups_take_over_when_every_primary_is_full() {
    let mut backup = server(3, 0);
    backup.backup = true;
    let mut u = Upstream::new(Policy::RoundRobin, vec![server(1, 1), server(2, 1), backup]);
    let picks: Vec<Option<usize>> = (0..4).map(|_| u.start(b"").1).collect();
    assert_eq!(picks, [Some(0), Some(1), Some(2), Some(2)]);
}

#[test]
fn every_method_skips_a_full_server() {
    let chash = Policy::Hash {
        key: "$request_uri".into(),
        consistent: true,
    };
    let hash = Policy::Hash {
        key: "$request_uri".into(),
        consistent: false,
    };
    for policy in [
        Policy::RoundRobin,
        Policy::LeastConn,
        Policy::Random { two: false },
        Policy::Random { two: true },
        Policy::IpHash,
        hash,
        chash,
    ] {
        // Server 0 may hold one; the others are unlimited.
        let mut u = Upstream::new(
            policy.clone(),
            vec![server(1, 1), server(2, 0), server(3, 0)],
        );
        for i in 0..60u32 {
            let key = match policy {
                Policy::IpHash => vec![10, i as u8, (i * 37) as u8, 1],
                _ => format!("/key/{i}").into_bytes(),
            };
            let (_, picked) = u.start(&key);
            assert!(picked.is_some(), "{policy:?}: request {i} got no server");
            assert!(
                u.conns(0) <= 1,
                "{policy:?}: server 0 has {} after {i}",
                u.conns(0)
            );
        }
        assert_eq!(u.conns(0), 1, "{policy:?}: server 0 was never picked");
        let total: u32 = (0..3).map(|i| u.conns(i)).sum();
        assert_eq!(total, 60, "{policy:?}: a request got no server");
    }
}
