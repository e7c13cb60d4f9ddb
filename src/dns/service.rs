//! `service=` lines (SRV records, as nginx ≥ 1.27.3 reads them): the SRV
//! answer of the name asked, and the address lookups of its targets, made
//! one [`Lookup::Service`] with every address at its record's port,
//! weight and priority. `crate::table::names::endpoints` makes servers of
//! it.

use std::net::SocketAddr;

use crate::dns::wire::{Reply, SrvRecord, TYPE_SRV};
use crate::dns::{ask_blocking, combine, lookup_blocking, Resolver};
use crate::table::names::{check_host, Lookup, SrvEndpoint};

/// The SRV records of `name` in `reply`, to resolve their targets: `Err`
/// is the lookup's end (NXDOMAIN, no record, a failure).
pub fn service_records(
    name: &str,
    reply: Result<Reply, String>,
) -> Result<(Vec<SrvRecord>, u32), Lookup> {
    match reply {
        Ok(Reply::Services { records, ttl }) if !records.is_empty() => Ok((records, ttl)),
        Ok(Reply::Services { .. }) => Err(Lookup::NotFound(format!(
            "{name}: the name has no SRV records"
        ))),
        other => Err(combine(name, &[other])),
    }
}

/// The distinct target hosts of `records` worth asking (a name as a
/// server line may hold), in their order.
pub fn service_targets(records: &[SrvRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in records {
        if check_host(&r.target).is_ok() && !out.contains(&r.target) {
            out.push(r.target.clone());
        }
    }
    out
}

/// What an SRV answer of `name` (`records`, `ttl`) and the lookups of its
/// targets (`targets`: host, lookup) make: every address of every target
/// at its record's port, weight and priority, with the smallest TTL. A
/// target that does not exist is left out (nginx logs it and goes on);
/// one whose lookup failed fails the whole, so that a timeout never
/// removes servers; with no address left, "not found".
pub fn combine_service(
    name: &str,
    records: &[SrvRecord],
    ttl: u32,
    targets: &[(String, Lookup)],
) -> Lookup {
    let mut endpoints = Vec::new();
    let mut ttl = ttl;
    let mut missing = Vec::new();
    for r in records {
        match targets.iter().find(|(h, _)| *h == r.target).map(|(_, l)| l) {
            Some(Lookup::Found { addrs, ttl: t }) => {
                ttl = ttl.min(*t);
                endpoints.extend(addrs.iter().map(|ip| SrvEndpoint {
                    priority: r.priority,
                    addr: SocketAddr::new(*ip, r.port),
                    weight: r.weight,
                }));
            }
            Some(Lookup::Failed(why)) => {
                return Lookup::Failed(format!("{name}: target {why}"));
            }
            Some(Lookup::NotFound(why)) => missing.push(why.clone()),
            Some(Lookup::Service { .. }) | None => {
                missing.push(format!("{}: not a host name to ask", r.target))
            }
        }
    }
    if endpoints.is_empty() {
        return Lookup::NotFound(format!(
            "{name}: no target of its SRV records has an address ({})",
            missing.join("; ")
        ));
    }
    endpoints.sort();
    Lookup::Service { endpoints, ttl }
}

/// Looks the SRV name `name` up with `resolver`, blocking, then each of
/// its targets' addresses (see [`combine_service`]).
pub fn lookup_service_blocking(name: &str, resolver: &Resolver) -> Lookup {
    if resolver.servers.is_empty() {
        return lookup_blocking(name, resolver);
    }
    let (records, ttl) = match service_records(name, ask_blocking(name, TYPE_SRV, resolver)) {
        Ok(found) => found,
        Err(end) => return end,
    };
    let targets: Vec<(String, Lookup)> = service_targets(&records)
        .into_iter()
        .map(|t| {
            let l = lookup_blocking(&t, resolver);
            (t, l)
        })
        .collect();
    combine_service(name, &records, ttl, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_srv_answer_and_its_targets_make_one_lookup() {
        let rec = |priority, weight, port, target: &str| SrvRecord {
            priority,
            weight,
            port,
            target: target.into(),
        };
        let records = [rec(0, 3, 8080, "a.internal"), rec(1, 1, 9090, "b.internal")];
        let found = |a: &str, ttl| Lookup::Found {
            addrs: vec![a.parse().unwrap()],
            ttl,
        };
        let l = combine_service(
            "_http._tcp.svc",
            &records,
            30,
            &[
                ("a.internal".into(), found("10.0.0.1", 60)),
                ("b.internal".into(), found("10.0.0.2", 7)),
            ],
        );
        assert_eq!(
            l,
            Lookup::Service {
                endpoints: vec![
                    SrvEndpoint {
                        priority: 0,
                        addr: "10.0.0.1:8080".parse().unwrap(),
                        weight: 3
                    },
                    SrvEndpoint {
                        priority: 1,
                        addr: "10.0.0.2:9090".parse().unwrap(),
                        weight: 1
                    },
                ],
                ttl: 7
            }
        );
        // A target that does not exist is left out; one that timed out
        // fails the whole (the last good servers stay).
        let nx = Lookup::NotFound("b.internal: NXDOMAIN".into());
        let l = combine_service(
            "s",
            &records,
            30,
            &[
                ("a.internal".into(), found("10.0.0.1", 60)),
                ("b.internal".into(), nx.clone()),
            ],
        );
        assert!(matches!(l, Lookup::Service { ref endpoints, ttl: 30 } if endpoints.len() == 1));
        let l = combine_service(
            "s",
            &records,
            30,
            &[
                ("a.internal".into(), found("10.0.0.1", 60)),
                ("b.internal".into(), Lookup::Failed("timed out".into())),
            ],
        );
        assert!(matches!(l, Lookup::Failed(m) if m.contains("timed out")));
        let l = combine_service("s", &records, 30, &[("b.internal".into(), nx)]);
        assert!(matches!(l, Lookup::NotFound(m) if m.contains("no target")));
        // The SRV reply itself: no record is "not found", NXDOMAIN too.
        let none = Ok(Reply::Services {
            records: vec![],
            ttl: 0,
        });
        assert!(matches!(
            service_records("s", none),
            Err(Lookup::NotFound(_))
        ));
        assert!(matches!(
            service_records("s", Ok(Reply::NoSuchName)),
            Err(Lookup::NotFound(_))
        ));
        assert!(matches!(
            service_records("s", Err("timed out".into())),
            Err(Lookup::Failed(_))
        ));
        // Targets asked once each, and only names a server line may hold.
        let dup = [
            rec(0, 1, 1, "a.internal"),
            rec(0, 1, 2, "a.internal"),
            rec(0, 1, 3, "a b"),
        ];
        assert_eq!(service_targets(&dup), ["a.internal"]);
    }
}
