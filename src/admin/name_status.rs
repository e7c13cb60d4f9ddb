//! What the resolver last found for each `resolve` line, for every worker
//! to show: the worker that holds the resolver lease (`crate::dns`) writes
//! it beside the state file, in `PATH.dns` (JSON, mode 0644), after each
//! lookup; the others read it when asked. The table itself changes only
//! when addresses do, so a lookup that found the same ones, or failed,
//! leaves its traces here and nowhere else.
//!
//! [`report`] is what the observability pages read: per upstream, each
//! `server NAME` line with its addresses, its last lookup, its error and
//! how many lookups of it failed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::upstream_file::replace_file;
use crate::table::model::{Table, Upstream};
use crate::table::syntax::render_named;

/// What is known of one `resolve` line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub upstream: String,
    /// `NAME` or `NAME:PORT`, as the line writes it.
    pub server: String,
    /// When the last lookup ended, Unix ms (0: none yet).
    pub resolved_ms: u64,
    /// Why the last lookup gave no address, if it did not.
    pub error: Option<String>,
    /// The addresses of the last good answer.
    pub addresses: Vec<String>,
    pub ttl: u32,
    /// When it is asked next, Unix ms.
    pub next_ms: u64,
    /// Lookups that gave no address (timeouts, SERVFAIL, NXDOMAIN, ...)
    /// since the line was first looked up: monotonic, carried from one
    /// holder of the resolver lease to the next (and across reloads) by
    /// this file. Files written before it read as 0.
    #[serde(default)]
    pub failures: u64,
}

/// One `server NAME` line of one upstream, as the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NameReport {
    /// The upstream, as it was created.
    pub upstream: String,
    /// `NAME` or `NAME:PORT` as the line writes it: the `name` label.
    pub name: String,
    /// `service=` of an SRV line.
    pub service: Option<String>,
    /// Re-resolved (`resolve`), or resolved once at its write.
    pub resolve: bool,
    /// The servers the table holds for it now, `ADDR:PORT`.
    pub addresses: Vec<String>,
    /// When it was last resolved, Unix ms: its last lookup, else the
    /// answer it was written with.
    pub resolved_ms: u64,
    /// Why the last lookup gave no address, if it did not.
    pub error: Option<String>,
    /// Failed lookups so far: a counter (see [`Status::failures`]).
    pub failures: u64,
}

/// Every `server NAME` line of `table`, upstream by upstream in table
/// order, with what the resolver last published beside the state file
/// at `state` (read now: any worker may call it, the lease holder writes
/// it). A line resolved once at its write has no error and no failures.
///
/// The metrics page adds `dyups_upstream_resolve_failures_total` with:
///
/// ```ignore
/// for r in name_status::report(&table, &state_path) {
///     counter.sample(&[("upstream", &r.upstream), ("name", &r.name)], r.failures);
/// }
/// ```
pub fn report(table: &Table, state: &Path) -> Vec<NameReport> {
    let statuses = read(state);
    let mut out = Vec::new();
    for u in &table.upstreams {
        for (i, n) in u.names.iter().enumerate() {
            let target = n.target();
            let last = n
                .resolve
                .then(|| find(&statuses, &u.name, &target))
                .flatten();
            out.push(NameReport {
                upstream: u.name.clone(),
                name: target,
                service: n.service.clone(),
                resolve: n.resolve,
                addresses: addresses_of(u, i),
                resolved_ms: last.map_or(n.resolved_ms, |s| s.resolved_ms.max(n.resolved_ms)),
                error: last.and_then(|s| s.error.clone()),
                failures: last.map_or(0, |s| s.failures),
            });
        }
    }
    out
}

/// What `statuses` say of line `server` of upstream `upstream`.
fn find<'a>(statuses: &'a [Status], upstream: &str, server: &str) -> Option<&'a Status> {
    statuses.iter().find(|s| {
        s.upstream.eq_ignore_ascii_case(upstream) && s.server.eq_ignore_ascii_case(server)
    })
}

/// The servers line `i` of `u` made.
fn addresses_of(u: &Upstream, i: usize) -> Vec<String> {
    u.servers
        .iter()
        .filter(|s| s.from == Some(i as u16))
        .map(|s| s.addr.to_string())
        .collect()
}

/// The file beside the state file at `state`.
pub fn path_for(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".dns");
    state.with_file_name(name)
}

/// The statuses the resolver wrote for the state file at `state`; none
/// when it wrote none (or the file is not one it wrote).
pub fn read(state: &Path) -> Vec<Status> {
    std::fs::read(path_for(state))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes `statuses` for the state file at `state`, atomically, mode
/// 0644 whatever the umask.
pub fn write(state: &Path, statuses: &[Status]) -> Result<(), String> {
    let path = path_for(state);
    let bytes = serde_json::to_vec(statuses).expect("plain data serialises");
    replace_file(&path, &bytes, false)
        .map_err(|e| format!("could not write {}: {e}", path.display()))
}

/// Adds to `v`, the JSON of `u`, its `server NAME` lines (`names`: each
/// line as written, whether it is re-resolved, the addresses the table
/// holds for it and when they were resolved, and what the resolver last
/// found, from `status`), and the line each server came from (`name`).
pub fn add_to_json(v: &mut Value, u: &Upstream, status: &[Status]) {
    if u.names.is_empty() {
        return;
    }
    let names: Vec<Value> = u
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addresses = addresses_of(u, i);
            let last = find(status, &u.name, &n.target());
            let mut o = json!({
                "server": n.target(),
                "line": render_named(n),
                "resolve": n.resolve,
                "addresses": addresses,
                "resolved": n.resolved_ms,
                "ttl": n.ttl,
                "error": Value::Null,
            });
            if let Some(service) = &n.service {
                o["service"] = json!(service);
            }
            if let Some(last) = last {
                o["last_lookup"] = json!(last.resolved_ms);
                o["error"] = json!(last.error);
                o["next_lookup"] = json!(last.next_ms);
                o["failures"] = json!(last.failures);
            }
            o
        })
        .collect();
    v["names"] = Value::Array(names);
    if let Some(Value::Array(servers)) = v.get_mut("servers") {
        for (s, spec) in servers.iter_mut().zip(&u.servers) {
            if let Some(i) = spec.from {
                s["name"] = json!(u.names[usize::from(i)].target());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::names::{resolve_pending, Answers, Lookup, Query};
    use crate::table::syntax::parse_body;

    #[test]
    fn the_report_has_every_name_line_with_what_the_resolver_published() {
        let mut t = Table::default();
        t.upsert(
            parse_body(
                "Shop",
                "server app.internal:8080 resolve; server once.internal; server 10.0.0.9;",
            )
            .unwrap(),
        );
        let one = |a: &str| Lookup::Found {
            addrs: vec![a.parse().unwrap()],
            ttl: 5,
        };
        let answers = Answers {
            found: [
                (Query::new("app.internal", false), one("10.0.0.1")),
                (Query::new("once.internal", false), one("10.0.0.2")),
            ]
            .into(),
            at_ms: 1000,
            default_ipv6: false,
        };
        resolve_pending(&mut t, &answers).unwrap();
        let dir = crate::testing::TempDir::new();
        let state = dir.path().join("dyups.state");
        // Nothing published yet: what the table holds, no failure.
        let r = report(&t, &state);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].upstream.as_str(), r[0].name.as_str(), r[0].failures),
            ("Shop", "app.internal:8080", 0)
        );
        assert_eq!(r[0].addresses, ["10.0.0.1:8080"]);
        assert_eq!(r[0].resolved_ms, 1000);
        write(
            &state,
            &[Status {
                upstream: "shop".into(),
                server: "APP.internal:8080".into(),
                resolved_ms: 5000,
                error: Some("timed out".into()),
                failures: 7,
                ..Status::default()
            }],
        )
        .unwrap();
        let r = report(&t, &state);
        assert_eq!(r[0].failures, 7);
        assert_eq!(r[0].error.as_deref(), Some("timed out"));
        assert_eq!(r[0].resolved_ms, 5000);
        // A line resolved once at its write: no lookup since, no failure.
        assert_eq!(
            (
                r[1].name.as_str(),
                r[1].resolve,
                r[1].failures,
                r[1].error.clone()
            ),
            ("once.internal", false, 0, None)
        );
        // A file written before the counter reads as 0 failures.
        std::fs::write(
            path_for(&state),
            r#"[{"upstream":"Shop","server":"app.internal:8080","resolved_ms":1,"error":null,"addresses":[],"ttl":1,"next_ms":2}]"#,
        )
        .unwrap();
        assert_eq!(report(&t, &state)[0].failures, 0);
    }
}
