//! The re-resolution of `resolve` lines, in the worker that holds the
//! resolver lease: which lines are due, and what each answer changes.
//!
//! A line is asked again when its answer's lifetime is over (its TTL, or
//! the resolver's `valid=`); after a timeout or a server failure the last
//! good addresses stay and it is asked again after [`RETRY_MS`]; after
//! NXDOMAIN its servers go (never the upstream's last available one,
//! `crate::table::names::apply_lookup` keeps that). Only an answer that
//! differs from the table makes a write, so a name whose addresses stay
//! costs one query per TTL and nothing else.
//!
//! Every lookup that gives no address (a failure, NXDOMAIN) counts in its
//! line's [`Status::failures`]; a new holder of the lease starts from the
//! counts the last one published (`PATH.dns`), so they only grow, through
//! lease changes and reloads alike.

use std::collections::HashMap;

use crate::dns::{Defaults, Resolver};
use crate::table::model::Table;
use crate::table::names::{endpoints, holds, Endpoint, Lookup, NamedServer, Query};

/// How soon a lookup that failed (timeout, SERVFAIL) is made again.
pub const RETRY_MS: u64 = 1000;

pub use crate::admin::name_status::Status;

/// One lookup for a transport to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: u64,
    /// The name to ask, and whether for SRV records.
    pub query: Query,
    pub resolver: Resolver,
}

/// A change an answer asks for: the line's servers are to be what
/// `lookup` found (none after NXDOMAIN), in one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub upstream: String,
    pub line: NamedServer,
    /// A [`Lookup::Found`] or [`Lookup::Service`], or a
    /// [`Lookup::NotFound`].
    pub lookup: Lookup,
    pub ttl: u32,
}

/// Upstream name and host in lower case, the port, and the service.
type Key = (String, String, u16, Option<String>);

#[derive(Debug)]
struct Entry {
    key: Key,
    line: NamedServer,
    resolver: Resolver,
    due_ms: u64,
    /// The lookup in flight, if any.
    job: Option<u64>,
    status: Status,
}

/// The lines this worker re-resolves while it holds the lease.
#[derive(Debug, Default)]
pub struct Schedule {
    entries: Vec<Entry>,
    /// The table generation `entries` follow.
    seen: Option<u64>,
    next_job: u64,
    /// What the previous holder published, for the lines this one has
    /// not looked up yet: their failure counts go on from there.
    carried: Vec<Status>,
}

/// What the answer `lookup` makes of line `line` of `upstream` in
/// `table`, and whether the table holds that already; `None` when the
/// line is gone.
fn wanted(
    table: &Table,
    upstream: &str,
    line: &NamedServer,
    lookup: &Lookup,
) -> Option<(Vec<Endpoint>, bool)> {
    let u = table.get(upstream)?;
    let i = u.names.iter().position(|n| n.same_line(line))?;
    let want = endpoints(&u.names[i], &u.policy, lookup);
    let same = holds(u, i, &want);
    Some((want, same))
}

impl Schedule {
    pub fn new() -> Schedule {
        Schedule::default()
    }

    /// A schedule that takes over from the statuses `previous` published
    /// (`PATH.dns`): the failure counts of the lines go on from theirs.
    pub fn resuming(previous: Vec<Status>) -> Schedule {
        Schedule {
            carried: previous,
            ..Schedule::default()
        }
    }

    /// Forgets everything (the lease went to another worker).
    pub fn clear(&mut self) {
        *self = Schedule {
            next_job: self.next_job,
            ..Schedule::default()
        };
    }

    /// Follows the `resolve` lines of `table` (of `generation`): a line
    /// that stays keeps its schedule; a new one is due when the answer it
    /// was written with expires.
    fn follow(&mut self, table: &Table, generation: u64, defaults: &Defaults) {
        if self.seen == Some(generation) {
            return;
        }
        self.seen = Some(generation);
        let mut old: HashMap<Key, Entry> =
            self.entries.drain(..).map(|e| (e.key.clone(), e)).collect();
        for u in &table.upstreams {
            let resolver = Resolver::of(u, defaults);
            for (i, n) in u.names.iter().enumerate().filter(|(_, n)| n.resolve) {
                let key = (
                    u.name.to_ascii_lowercase(),
                    n.host.to_ascii_lowercase(),
                    n.port(),
                    n.service.as_ref().map(|s| s.to_ascii_lowercase()),
                );
                let entry = match old.remove(&key) {
                    Some(mut e) if e.line.same_line(n) && e.resolver == resolver => {
                        e.line = n.clone();
                        e
                    }
                    _ => {
                        let addresses = u
                            .servers
                            .iter()
                            .filter(|s| s.from == Some(i as u16))
                            .map(|s| s.addr.to_string())
                            .collect();
                        let due_ms = n.resolved_ms + u64::from(resolver.lifetime_s(n.ttl)) * 1000;
                        let failures = self
                            .carried
                            .iter()
                            .find(|s| {
                                s.upstream.eq_ignore_ascii_case(&u.name)
                                    && s.server.eq_ignore_ascii_case(&n.target())
                            })
                            .map_or(0, |s| s.failures);
                        Entry {
                            key,
                            line: n.clone(),
                            resolver: resolver.clone(),
                            due_ms,
                            job: None,
                            status: Status {
                                upstream: u.name.clone(),
                                server: n.target(),
                                resolved_ms: n.resolved_ms,
                                error: None,
                                addresses,
                                ttl: n.ttl,
                                next_ms: due_ms,
                                failures,
                            },
                        }
                    }
                };
                self.entries.push(entry);
            }
        }
    }

    /// The lookups due at `now_ms` for the `resolve` lines of `table`;
    /// each is in flight until [`record`](Self::record) gets its answer.
    pub fn due(
        &mut self,
        table: &Table,
        generation: u64,
        defaults: &Defaults,
        now_ms: u64,
    ) -> Vec<Job> {
        self.follow(table, generation, defaults);
        let mut jobs = Vec::new();
        for e in &mut self.entries {
            if e.job.is_some() || e.due_ms > now_ms {
                continue;
            }
            self.next_job += 1;
            e.job = Some(self.next_job);
            jobs.push(Job {
                id: self.next_job,
                query: Query::of(&e.line, e.resolver.ipv6),
                resolver: e.resolver.clone(),
            });
        }
        jobs
    }

    /// Takes the answer to lookup `id`; returns the write it asks for, if
    /// its addresses differ from what `table` holds.
    pub fn record(
        &mut self,
        id: u64,
        lookup: Lookup,
        table: &Table,
        now_ms: u64,
    ) -> Option<Update> {
        let e = self.entries.iter_mut().find(|e| e.job == Some(id))?;
        e.job = None;
        e.status.resolved_ms = now_ms;
        let ttl = match &lookup {
            Lookup::Found { ttl, .. } | Lookup::Service { ttl, .. } => {
                e.due_ms = now_ms + u64::from(e.resolver.lifetime_s(*ttl)) * 1000;
                e.status.error = None;
                e.status.ttl = *ttl;
                *ttl
            }
            Lookup::NotFound(why) => {
                e.due_ms = now_ms + u64::from(e.resolver.lifetime_s(0)) * 1000;
                e.status.error = Some(why.clone());
                e.status.failures += 1;
                0
            }
            Lookup::Failed(why) => {
                e.due_ms = now_ms + RETRY_MS;
                e.status.error = Some(format!("{why}; the last good addresses are kept"));
                e.status.failures += 1;
                e.status.next_ms = e.due_ms;
                return None;
            }
        };
        e.status.next_ms = e.due_ms;
        let (want, same) = wanted(table, &e.status.upstream, &e.line, &lookup)?;
        e.status.addresses = want.iter().map(|w| w.addr.to_string()).collect();
        (!same).then(|| Update {
            upstream: e.status.upstream.clone(),
            line: e.line.clone(),
            lookup,
            ttl,
        })
    }

    /// Forgets the lookup `id` in flight (its light thread died): it is
    /// due again at once.
    pub fn abandon(&mut self, id: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.job == Some(id)) {
            e.job = None;
        }
    }

    /// What is known of every `resolve` line, in table order.
    pub fn statuses(&self) -> Vec<Status> {
        self.entries.iter().map(|e| e.status.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::names::{resolve_pending, Answers};
    use crate::table::syntax::parse_body;

    fn table(body: &str, addrs: &[&str], ttl: u32) -> Table {
        let mut t = Table::default();
        t.upsert(parse_body("u", body).unwrap());
        let found = Lookup::Found {
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ttl,
        };
        let answers = Answers {
            found: [(Query::new("app.internal", false), found)].into(),
            at_ms: 10_000,
            default_ipv6: false,
        };
        resolve_pending(&mut t, &answers).unwrap();
        t
    }

    fn defaults() -> Defaults {
        Defaults {
            servers: vec!["127.0.0.1:53".parse().unwrap()],
            ipv6: false,
            ..Defaults::default()
        }
    }

    fn found(addrs: &[&str], ttl: u32) -> Lookup {
        Lookup::Found {
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ttl,
        }
    }

    #[test]
    fn a_line_is_asked_again_when_its_ttl_is_over_and_only_a_change_writes() {
        let t = table("server app.internal:8080 resolve;", &["10.0.0.1"], 5);
        let mut s = Schedule::new();
        let d = defaults();
        assert!(
            s.due(&t, 1, &d, 14_999).is_empty(),
            "the write's answer lasts 5 s"
        );
        let jobs = s.due(&t, 1, &d, 15_000);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].query, Query::new("app.internal", false));
        assert!(s.due(&t, 1, &d, 15_001).is_empty(), "in flight");
        // The same addresses: no write, asked again a TTL later.
        assert_eq!(
            s.record(jobs[0].id, found(&["10.0.0.1"], 2), &t, 15_100),
            None
        );
        assert!(s.due(&t, 1, &d, 17_099).is_empty());
        let jobs = s.due(&t, 1, &d, 17_100);
        let update = s
            .record(jobs[0].id, found(&["10.0.0.2", "10.0.0.1"], 2), &t, 17_200)
            .unwrap();
        assert!(matches!(&update.lookup, Lookup::Found { addrs, .. } if addrs.len() == 2));
        assert_eq!(update.upstream, "u");
        // A failure keeps the addresses and retries after a second.
        let jobs = s.due(&t, 1, &d, 19_200);
        assert_eq!(
            s.record(jobs[0].id, Lookup::Failed("timed out".into()), &t, 19_300),
            None
        );
        assert!(s.statuses()[0]
            .error
            .as_deref()
            .unwrap()
            .contains("timed out"));
        assert!(s.due(&t, 1, &d, 20_299).is_empty());
        let jobs = s.due(&t, 1, &d, 20_300);
        // NXDOMAIN asks for the servers to go.
        let update = s
            .record(jobs[0].id, Lookup::NotFound("NXDOMAIN".into()), &t, 20_400)
            .unwrap();
        assert!(matches!(update.lookup, Lookup::NotFound(_)));
    }

    #[test]
    fn lines_without_resolve_are_not_asked_and_a_new_table_keeps_the_schedule() {
        let t = table("server app.internal:8080;", &["10.0.0.1"], 1);
        let mut s = Schedule::new();
        assert!(s.due(&t, 1, &defaults(), 99_000).is_empty());
        let t = table("server app.internal:8080 resolve;", &["10.0.0.1"], 1);
        let jobs = s.due(&t, 2, &defaults(), 11_000);
        assert_eq!(jobs.len(), 1);
        // Another generation with the same line: still in flight.
        assert!(s.due(&t, 3, &defaults(), 11_000).is_empty());
        assert_eq!(
            s.record(jobs[0].id, found(&["10.0.0.1"], 60), &t, 11_100),
            None
        );
        assert!(s.due(&t, 4, &defaults(), 70_000).is_empty());
    }

    #[test]
    fn failed_lookups_count_and_a_new_holder_goes_on_from_the_published_count() {
        let t = table("server app.internal:8080 resolve;", &["10.0.0.1"], 1);
        let mut s = Schedule::new();
        let d = defaults();
        let mut at = 11_000;
        for lookup in [
            Lookup::Failed("timed out".into()),
            Lookup::NotFound("NXDOMAIN".into()),
            found(&["10.0.0.1"], 1),
            Lookup::Failed("SERVFAIL".into()),
        ] {
            let jobs = s.due(&t, 1, &d, at);
            assert_eq!(jobs.len(), 1, "due at {at}");
            s.record(jobs[0].id, lookup, &t, at);
            at += 2_000;
        }
        assert_eq!(s.statuses()[0].failures, 3, "a good answer resets nothing");
        // The next holder (another worker, or after a reload) starts from
        // what this one published.
        let mut next = Schedule::resuming(s.statuses());
        let jobs = next.due(&t, 1, &d, at);
        assert_eq!(next.statuses()[0].failures, 3);
        next.record(jobs[0].id, Lookup::Failed("timed out".into()), &t, at);
        assert_eq!(next.statuses()[0].failures, 4);
    }
}
