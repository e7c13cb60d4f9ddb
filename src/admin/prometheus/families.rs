//! The per-server families of `/metrics`: one entry a family (or one
//! labelled part of one), with its name, type, help and how a
//! [`ServerView`] gives its value. The help texts of
//! nginx-prometheus-exporter's families are its own words, widened where
//! ours counts something more precise.

use super::super::server_state::ServerView;
use crate::health::Outcome;
use crate::store::stats::BUCKETS_MS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One per-server family, or one labelled part of one (`extra`).
pub struct ServerFamily {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// A label every sample of this entry carries, written as is
    /// (`code="2xx"`); empty for none.
    pub extra: &'static str,
    /// The server's value; `None` leaves the server out of the family
    /// (a check figure of an upstream without checks).
    pub value: fn(&ServerView) -> Option<f64>,
}

/// A histogram's figures: counts per bucket (not cumulative), the last one
/// for values above every bound (`+Inf`), and the sum of what was observed.
pub struct Histogram<'a> {
    pub bounds: &'a [f64],
    pub counts: &'a [u64],
    pub sum: f64,
}

/// One per-server histogram family.
pub struct HistogramFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub value: for<'a> fn(&'a ServerView) -> Option<Histogram<'a>>,
}

fn shared(s: &ServerView, n: u32) -> Option<f64> {
    s.shared.then_some(f64::from(n))
}

/// A counter of a server with a cell (as f64: exact up to 2^53).
fn counted(s: &ServerView, n: u64) -> Option<f64> {
    s.shared.then_some(n as f64)
}

/// A health-check counter: only for an upstream with a `check` line.
fn checked(s: &ServerView, n: u64) -> Option<f64> {
    s.upstream.check.line.as_ref().and_then(|_| counted(s, n))
}

/// The response-time buckets' bounds in seconds, from the store's
/// [`BUCKETS_MS`]: one bucket set for the JSON and the histogram.
pub const BOUNDS_S: [f64; BUCKETS_MS.len()] = {
    let mut b = [0.0; BUCKETS_MS.len()];
    let mut i = 0;
    while i < b.len() {
        b[i] = BUCKETS_MS[i] as f64 / 1000.0;
        i += 1;
    }
    b
};

const RESPONSES_HELP: &str =
    "Responses from the server by status class, each attempt of a request counted (where the log hook runs)";

/// The per-server families, in the order they are rendered. The help
/// texts of the exporter's families are its own words.
pub const SERVER_FAMILIES: &[ServerFamily] = &[
    ServerFamily {
        name: "dyups_upstream_server_state",
        kind: Kind::Gauge,
        help: "Current state (1 up, 2 draining, 3 down, 4 unavail, 5 checking, 6 unhealthy)",
        extra: "",
        value: |s| Some(f64::from(s.state.code())),
    },
    ServerFamily {
        name: "dyups_upstream_server_active",
        kind: Kind::Gauge,
        help: "Active connections",
        extra: "",
        value: |s| shared(s, s.active),
    },
    ServerFamily {
        name: "dyups_upstream_server_limit",
        kind: Kind::Gauge,
        help: "Limit for connections which corresponds to the max_conns parameter of the upstream server. Zero value means there is no limit",
        extra: "",
        value: |s| Some(f64::from(s.spec.max_conns)),
    },
    ServerFamily {
        name: "dyups_upstream_server_weight",
        kind: Kind::Gauge,
        help: "Weight of the server, as its server line sets it",
        extra: "",
        value: |s| Some(f64::from(s.spec.weight)),
    },
    ServerFamily {
        name: "dyups_upstream_server_backup",
        kind: Kind::Gauge,
        help: "1 for a backup server, 0 for a primary",
        extra: "",
        value: |s| Some(f64::from(u8::from(s.spec.backup))),
    },
    ServerFamily {
        name: "dyups_upstream_server_window_fails",
        kind: Kind::Gauge,
        help: "Unsuccessful attempts counted in the current fail_timeout window, which max_fails is compared with",
        extra: "",
        value: |s| shared(s, s.fails),
    },
    ServerFamily {
        name: "dyups_upstream_server_requests_total",
        kind: Kind::Counter,
        help: "Total client requests sent to the server: picks by the balancer, each retry one more",
        extra: "",
        value: |s| counted(s, s.counters.requests),
    },
    ServerFamily {
        name: "dyups_upstream_server_responses_total",
        kind: Kind::Counter,
        help: RESPONSES_HELP,
        extra: "code=\"1xx\"",
        value: |s| counted(s, s.counters.responses[0]),
    },
    ServerFamily {
        name: "dyups_upstream_server_responses_total",
        kind: Kind::Counter,
        help: RESPONSES_HELP,
        extra: "code=\"2xx\"",
        value: |s| counted(s, s.counters.responses[1]),
    },
    ServerFamily {
        name: "dyups_upstream_server_responses_total",
        kind: Kind::Counter,
        help: RESPONSES_HELP,
        extra: "code=\"3xx\"",
        value: |s| counted(s, s.counters.responses[2]),
    },
    ServerFamily {
        name: "dyups_upstream_server_responses_total",
        kind: Kind::Counter,
        help: RESPONSES_HELP,
        extra: "code=\"4xx\"",
        value: |s| counted(s, s.counters.responses[3]),
    },
    ServerFamily {
        name: "dyups_upstream_server_responses_total",
        kind: Kind::Counter,
        help: RESPONSES_HELP,
        extra: "code=\"5xx\"",
        value: |s| counted(s, s.counters.responses[4]),
    },
    ServerFamily {
        name: "dyups_upstream_server_fails_total",
        kind: Kind::Counter,
        help: "Number of unsuccessful attempts to communicate with the server (as proxy_next_upstream counts them)",
        extra: "",
        value: |s| counted(s, s.counters.fails),
    },
    ServerFamily {
        name: "dyups_upstream_server_unavail_total",
        kind: Kind::Counter,
        help: "How many times the server became unavailable for client requests (state 'unavail') due to the number of unsuccessful attempts reaching the max_fails threshold",
        extra: "",
        value: |s| counted(s, s.counters.unavail),
    },
    ServerFamily {
        name: "dyups_upstream_server_downtime_seconds_total",
        kind: Kind::Counter,
        help: "Time the server spent unavailable (state 'unavail'), up to now",
        extra: "",
        value: |s| s.shared.then(|| s.counters.downtime_ms as f64 / 1000.0),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_checks_total",
        kind: Kind::Counter,
        help: "Total health check requests",
        extra: "",
        value: |s| checked(s, s.counters.checks),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_fails_total",
        kind: Kind::Counter,
        help: "Failed health checks",
        extra: "",
        value: |s| checked(s, s.counters.check_fails),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_unhealthy_total",
        kind: Kind::Counter,
        help: "How many times the server became unhealthy (state 'unhealthy')",
        extra: "",
        value: |s| checked(s, s.counters.check_unhealthy),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_last_passed",
        kind: Kind::Gauge,
        help: "1 when the last health check passed, 0 when it failed",
        extra: "",
        value: |s| {
            s.last_probe
                .map(|p| f64::from(u8::from(p.outcome == Outcome::Passed)))
        },
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_last_check_timestamp_seconds",
        kind: Kind::Gauge,
        help: "When the last health check ended, Unix time",
        extra: "",
        value: |s| s.last_probe.map(|p| p.at_ms as f64 / 1000.0),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_last_latency_seconds",
        kind: Kind::Gauge,
        help: "How long the last health check took",
        extra: "",
        value: |s| s.last_probe.map(|p| f64::from(p.latency_ms) / 1000.0),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_consecutive_passes",
        kind: Kind::Gauge,
        help: "Health checks passed in a row (rise counts them)",
        extra: "",
        value: |s| s.verdict.map(|v| f64::from(v.passes)),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_consecutive_fails",
        kind: Kind::Gauge,
        help: "Health checks failed in a row (fall counts them)",
        extra: "",
        value: |s| s.verdict.map(|v| f64::from(v.failures)),
    },
];

/// The per-server histograms. A server's appears with its first timed
/// response, as a client library's labelled child does on its first
/// observation: an idle server (a backup, an upstream without the log hook,
/// most of 10,000) costs 14 lines a scrape for nothing otherwise, half the
/// exposition. A rate over the series misses only that first response.
pub const HISTOGRAMS: &[HistogramFamily] = &[HistogramFamily {
    name: "dyups_upstream_server_response_time_seconds",
    help: "Time to get the full response from the server ($upstream_response_time), each attempt of a request counted (where the log hook runs)",
    value: |s| {
        let h = &s.counters.response_time;
        let observed = h.buckets.iter().any(|&n| n > 0);
        (s.shared && observed).then(|| Histogram {
            bounds: &BOUNDS_S,
            counts: &h.buckets,
            sum: h.sum_us as f64 / 1e6,
        })
    },
}];
