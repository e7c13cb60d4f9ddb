//! The request path allocates nothing, under every balancing method: a
//! worker's picks (first attempts, retries after a failure or a `next`) and
//! the ends of requests, counted by an instrumented global allocator once the
//! worker is warm. Runs without libtest's harness, on one thread, because the
//! allocator's counts are the whole process's.

use std::alloc::System;
use std::path::PathBuf;

use ngx_dyups::admin::ops;
use ngx_dyups::balance::balancer::Retry;
use ngx_dyups::balance::worker::Worker;
use ngx_dyups::store::StateFile;
use ngx_dyups::table::model::Table;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const METHODS: [(&str, &str); 7] = [
    ("rr", ""),
    ("iphash", "ip_hash;"),
    ("hash", "hash $arg_k;"),
    ("chash", "hash $arg_k consistent;"),
    ("lc", "least_conn;"),
    ("random", "random;"),
    ("random2", "random two;"),
];

/// Request `key`'s whole life on upstream `id`: a first pick, a retry after
/// a failure, a retry after `next`, its end.
fn request(w: &mut Worker, id: u32, key: usize, hash_key: &[u8]) {
    let seen = w.snapshot().seen;
    for retry in [Retry::First, Retry::Failed, Retry::Next] {
        assert!(
            w.pick(id, seen, key, retry, hash_key) >= 0,
            "no server picked"
        );
    }
    w.done(key);
}

fn main() {
    let dir: PathBuf = std::env::temp_dir().join(format!("dyups-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // max_fails=0: failures are counted but never take a server out, so
    // every one of the many failed attempts below still finds a server.
    let servers = "server 127.0.0.1:8001 weight=2 max_fails=0; server 127.0.0.1:8002 max_fails=0; \
                   server 127.0.0.1:8003 weight=3 max_fails=0; server 127.0.0.1:8004 max_fails=0;";
    let store = StateFile::open(&dir.join("state"), 1 << 20, || {
        let mut t = Table::default();
        for (name, line) in METHODS {
            ops::update(&mut t, name, &format!("{line} {servers}"))?;
        }
        Ok(t)
    })
    .unwrap();
    let mut w = Worker::new(store).unwrap();
    let ids: Vec<u32> = METHODS
        .iter()
        .map(|(name, _)| w.upstream_id(name).unwrap())
        .collect();
    let keys: Vec<String> = (0..1000).map(|i| format!("/item/{i}")).collect();
    // ip_hash's key is the client address as $binary_remote_addr gives it.
    let clients: Vec<[u8; 4]> = (0..1000)
        .map(|i| [10, (i % 7) as u8, (i % 251) as u8, 7])
        .collect();
    let hash_key = |name: &str, i: usize| -> &[u8] {
        match name {
            "iphash" => &clients[i],
            "hash" | "chash" => keys[i].as_bytes(),
            _ => b"",
        }
    };

    // Warm: whatever is made once per worker is made now.
    for (m, (name, _)) in METHODS.iter().enumerate() {
        for i in 0..100 {
            request(&mut w, ids[m], 0x1000 + i * 64, hash_key(name, i));
        }
    }

    let mut failures = Vec::new();
    for (m, (name, _)) in METHODS.iter().enumerate() {
        let region = Region::new(GLOBAL);
        for i in 0..1000 {
            request(&mut w, ids[m], 0x10_0000 + i * 64, hash_key(name, i));
        }
        let change = region.change();
        if change.allocations + change.reallocations > 0 {
            failures.push(format!(
                "{name}: {} allocations, {} reallocations in 1,000 requests",
                change.allocations, change.reallocations
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        eprintln!("the request path allocated:\n  {}", failures.join("\n  "));
        std::process::exit(1);
    }
    println!(
        "hot path: 0 allocations in 3,000 picks and 1,000 request ends under each of {} methods",
        METHODS.len()
    );
}
