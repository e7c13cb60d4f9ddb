//! `dyups sync`: makes this host's table follow the upstreams in etcd
//! (README, "Many hosts"). Reads the whole prefix and applies it as one
//! write, then watches from the revision after, applying what each watch
//! response says as one write, with the revision in the same payload (see
//! `model::SyncMark`), so a restart resumes where the table is.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ngx_dyups::admin::ops::{self, Synced};
use ngx_dyups::store::{parse_size, StateFile, WriteOptions, DEFAULT_SIZE};
use ngx_dyups::table::model::{check_name, name_key, SyncMark, Upstream};
use ngx_dyups::table::syntax::parse_body;

use crate::args::{Parsed, Spec};
use crate::etcd::{Endpoint, Event, Failure as EtcdFailure, Header, Kv, WatchMessage};
use crate::{owner, Failure, Outcome, LOCK_WAIT};

pub const SPEC: Spec = Spec {
    valued: &["state", "size", "etcd", "prefix", "probe-interval"],
    flags: &[],
    positional: &[],
};

pub const HELP: &str = "\
usage: dyups sync --etcd URL[,URL...] [--prefix /dyups/] --state PATH
                  [--size SIZE] [--probe-interval SECONDS]

Runs beside nginx and makes the state file follow etcd: the upstream NAME
is the value of the key PREFIXupstreams/NAME, a body as `POST /upstream/NAME`
takes it (`server 10.0.0.1:80 weight=2; least_conn;`). Reads the whole
prefix and applies it as one write, then watches from the revision after,
applying each watch response as one write. The etcd revision is kept in the
state file with the table, so a restart resumes from it.

Upstreams it writes belong to etcd: a local write to one (REST, Lua, /ups,
dyups apply) is refused with 409 naming the key to write. Upstreams created
locally stay local and are never deleted by it.

  --etcd URLS             etcd's client URLs, comma-separated (http only)
  --prefix PREFIX         the key prefix (default /dyups/; ends with /)
  --state PATH            the state file (init's `path`); created if missing
  --size SIZE             the size of a state file it creates (default 2m)
  --probe-interval SECS   how often it checks etcd answers with quorum
                          while the watch is quiet (default 2)

etcd unreachable or without quorum: nothing changes, nginx keeps the last
table; it retries every endpoint with backoff and jitter and says so on
stderr and in PATH.sync, which `dyups inspect` reports (exit 9). A value
that does not parse is skipped (stderr names the key and the error); the
rest is applied. Compaction past its revision, or etcd restored to an older
revision or another cluster: it reads everything again and applies the
difference. Runs until killed.
";

/// The longest pause between attempts when etcd is down.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);

pub fn run(args: &Parsed) -> Outcome {
    let path = args.state().map_err(Failure::usage)?;
    let urls: Vec<String> = match args.text("etcd").map_err(Failure::usage)? {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    if urls.is_empty() {
        return Err(Failure::usage(
            "--etcd URL[,URL...] is required: etcd's client URLs",
        ));
    }
    if let Some(bad) = urls.iter().find(|u| !u.starts_with("http://")) {
        return Err(Failure::usage(format!(
            "--etcd {bad:?}: only http:// URLs are supported (run the agent on a host whose etcd client URL it can reach without TLS)"
        )));
    }
    let prefix = args
        .text("prefix")
        .map_err(Failure::usage)?
        .unwrap_or("/dyups/")
        .to_owned();
    if !prefix.ends_with('/') {
        return Err(Failure::usage(format!(
            "--prefix {prefix:?} must end with /"
        )));
    }
    let size = match args.text("size").map_err(Failure::usage)? {
        None => DEFAULT_SIZE,
        Some(t) => {
            parse_size(t).ok_or_else(|| Failure::usage(format!("--size {t:?} is not a size")))?
        }
    };
    let probe = match args.text("probe-interval").map_err(Failure::usage)? {
        None => Duration::from_secs(2),
        Some(t) => t
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && *s <= 3600.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| Failure::usage(format!("--probe-interval {t:?} is not seconds")))?,
    };
    let existed = path.exists();
    let store = StateFile::open(&path, size, || Ok(Default::default()))?;
    if !existed {
        owner::give_new_file(&path)?;
    }
    let mut agent = Agent {
        endpoints: urls.iter().map(|u| Endpoint::new(u)).collect(),
        at: 0,
        keys: format!("{prefix}upstreams/"),
        prefix,
        status: Status::new(&path),
        store,
        probe,
    };
    agent.run()
}

struct Agent {
    endpoints: Vec<Endpoint>,
    /// The endpoint in use; the next one is tried when it fails.
    at: usize,
    prefix: String,
    /// `<prefix>upstreams/`: the keys it reads.
    keys: String,
    store: Arc<StateFile>,
    status: Status,
    probe: Duration,
}

/// Why following stopped.
enum Stop {
    Etcd(String),
    Store(Failure),
}

impl From<EtcdFailure> for Stop {
    fn from(f: EtcdFailure) -> Stop {
        Stop::Etcd(f.to_string())
    }
}

impl From<ngx_dyups::Error> for Stop {
    fn from(e: ngx_dyups::Error) -> Stop {
        Stop::Store(e.into())
    }
}

impl Agent {
    fn run(&mut self) -> Outcome {
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            match self.follow() {
                Ok(never) => match never {},
                Err(Stop::Store(f)) => {
                    // The state file is nginx's: a write it refuses (damaged,
                    // full) is retried, the agent does not give up on etcd.
                    log(&format!("could not write the state file: {}", f.message));
                    self.status.set("store-failed", &f.message, self.revision());
                }
                Err(Stop::Etcd(why)) => {
                    log(&format!("{why}; keeping the last table, retrying"));
                    self.status.set("unreachable", &why, self.revision());
                }
            }
            // A long spell of following resets the backoff.
            if started.elapsed() > Duration::from_secs(30) {
                failures = 0;
            }
            failures = failures.saturating_add(1);
            self.at = (self.at + 1) % self.endpoints.len();
            std::thread::sleep(backoff(failures));
        }
    }

    fn revision(&self) -> u64 {
        self.store
            .read()
            .ok()
            .and_then(|s| s.table.sync)
            .map_or(0, |m| m.revision)
    }

    fn mark(&self) -> Result<Option<SyncMark>, Stop> {
        Ok(self.store.read()?.table.sync)
    }

    /// Reads etcd (in full when the table's mark does not fit it), then
    /// applies the watch until something fails.
    fn follow(&mut self) -> Result<std::convert::Infallible, Stop> {
        let etcd = &self.endpoints[self.at];
        let head = etcd.probe(self.keys.as_bytes())?;
        let mut revision = match self.mark()? {
            Some(m)
                if m.cluster_id == head.cluster_id
                    && m.prefix == self.prefix
                    && m.revision <= head.revision =>
            {
                m.revision
            }
            Some(m) => {
                log(&format!(
                    "the table is at revision {} of cluster {:x}, etcd {} is at {} of cluster {:x}: reading everything again",
                    m.revision, m.cluster_id, etcd.url, head.revision, head.cluster_id
                ));
                self.full()?
            }
            None => self.full()?,
        };
        loop {
            let watch = self.endpoints[self.at].watch(self.keys.as_bytes(), revision + 1);
            match self.apply_watch(&watch, &mut revision)? {
                // Compacted past our revision: read it all, watch again.
                Some(compacted) => {
                    log(&format!(
                        "revision {} was compacted (compact revision {compacted}): reading everything again",
                        revision + 1
                    ));
                    revision = self.full()?;
                }
                // etcd went back (restored from a backup): the same.
                None => revision = self.full()?,
            }
        }
    }

    /// Applies the watch's messages; returns the compact revision when it
    /// was compacted, `None` when etcd's revision went below ours.
    fn apply_watch(
        &mut self,
        watch: &Receiver<WatchMessage>,
        revision: &mut u64,
    ) -> Result<Option<u64>, Stop> {
        loop {
            let message = match watch.recv_timeout(self.probe) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    // A quiet watch proves nothing: ask for the revision, with
                    // quorum. A timeout never advances ours.
                    let head = self.endpoints[self.at].probe(self.keys.as_bytes())?;
                    if head.revision < *revision {
                        log(&format!(
                            "etcd {} is at revision {}, below the table's {}: etcd was restored; reading everything again",
                            self.endpoints[self.at].url, head.revision, revision
                        ));
                        return Ok(None);
                    }
                    self.status.set("following", "", *revision);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Stop::Etcd("the watch thread ended".into()))
                }
            };
            match message {
                WatchMessage::Created(head) if head.revision < *revision => {
                    log(&format!(
                        "etcd {} is at revision {}, below the table's {}: etcd was restored; reading everything again",
                        self.endpoints[self.at].url, head.revision, revision
                    ));
                    return Ok(None);
                }
                WatchMessage::Created(_) => {
                    self.status.set("following", "", *revision);
                }
                WatchMessage::Progress(head) => {
                    if head.revision > *revision {
                        *revision = self.write(Vec::new(), &[], &[], false, head)?;
                    }
                }
                WatchMessage::Compacted(at) => return Ok(Some(at)),
                WatchMessage::Ended(why) => return Err(Stop::Etcd(why)),
                WatchMessage::Events(head, events) => {
                    // What else arrived meanwhile goes into the same write.
                    let mut all = events;
                    let mut stop = None;
                    while let Ok(more) = watch.try_recv() {
                        match more {
                            WatchMessage::Events(_, e) => all.extend(e),
                            other => {
                                stop = Some(other);
                                break;
                            }
                        }
                    }
                    *revision = self.apply_events(all, head, *revision)?;
                    match stop {
                        Some(WatchMessage::Compacted(at)) => return Ok(Some(at)),
                        Some(WatchMessage::Ended(why)) => return Err(Stop::Etcd(why)),
                        _ => {}
                    }
                }
            }
        }
    }

    /// One write for these events; returns the revision the table is at.
    fn apply_events(&mut self, events: Vec<Event>, head: Header, at: u64) -> Result<u64, Stop> {
        // The last event's revision, not the header's: etcd may send a
        // header past events still to come in later responses.
        let revision = events
            .iter()
            .map(|e| match e {
                Event::Put(kv) | Event::Delete(kv) => kv.mod_revision,
            })
            .max()
            .unwrap_or(at)
            .max(at);
        // Later events for an upstream win over earlier ones (a map, not a
        // search per event: one response may hold a transaction's thousands).
        let mut last: Vec<(String, Option<Kv>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for e in events {
            let (kv, put) = match e {
                Event::Put(kv) => (kv, true),
                Event::Delete(kv) => (kv, false),
            };
            let Some(name) = self.name_of(&kv.key) else {
                continue;
            };
            let event = (name, put.then_some(kv));
            match at.entry(name_key(&event.0).into_owned()) {
                Entry::Occupied(i) => last[*i.get()] = event,
                Entry::Vacant(v) => {
                    v.insert(last.len());
                    last.push(event);
                }
            }
        }
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for (name, kv) in last {
            match kv {
                Some(kv) => {
                    if let Some(u) = self.parse(&name, &kv) {
                        puts.push(u);
                    }
                }
                None => deletes.push(name),
            }
        }
        self.write(
            puts,
            &deletes,
            &[],
            false,
            Header {
                cluster_id: head.cluster_id,
                revision,
            },
        )
    }

    /// Reads everything under the prefix and makes the table hold it (and
    /// its local upstreams): returns the revision read at.
    fn full(&mut self) -> Result<u64, Stop> {
        let started = Instant::now();
        let (head, kvs) = self.endpoints[self.at].range(self.keys.as_bytes())?;
        let ranged = started.elapsed();
        let mut puts = Vec::new();
        let mut keep = Vec::new();
        for kv in kvs {
            let Some(name) = self.name_of(&kv.key) else {
                continue;
            };
            match self.parse(&name, &kv) {
                Some(u) => puts.push(u),
                // Its last good value stays, as a skipped watch event's does.
                None => keep.push(name),
            }
        }
        let n = puts.len();
        let revision = self.write(puts, &[], &keep, true, head)?;
        log(&format!(
            "read {n} upstreams from etcd {} at revision {revision} in {:.2} s ({:.2} s reading etcd)",
            self.endpoints[self.at].url,
            started.elapsed().as_secs_f64(),
            ranged.as_secs_f64()
        ));
        Ok(revision)
    }

    fn write(
        &mut self,
        puts: Vec<Upstream>,
        deletes: &[String],
        keep: &[String],
        full: bool,
        head: Header,
    ) -> Result<u64, Stop> {
        let mark = SyncMark {
            revision: head.revision,
            cluster_id: head.cluster_id,
            prefix: self.prefix.clone(),
        };
        let opts = WriteOptions {
            wait: LOCK_WAIT,
            expect: None,
            durable: true,
        };
        let started = Instant::now();
        let (version, done) = self.store.write(&opts, |t| {
            // The local upstreams a put names, in one pass over the table,
            // not a search per put (a full read puts every upstream).
            let put: HashSet<_> = puts.iter().map(|u| name_key(&u.name)).collect();
            let took: Vec<String> = t
                .upstreams
                .iter()
                .filter(|u| u.owner.is_local() && put.contains(&name_key(&u.name)))
                .map(|u| u.name.clone())
                .collect();
            Ok((
                ops::sync_upstreams(t, mark, puts, deletes, keep, full),
                took,
            ))
        })?;
        let (Synced { put, skipped }, took) = done;
        for (name, why) in skipped {
            log(&format!("skipping upstream {name}: {why}"));
        }
        for name in took {
            log(&format!(
                "upstream {name} was local; etcd has it, so etcd owns it now"
            ));
        }
        if !(put.created.is_empty() && put.replaced.is_empty() && put.deleted.is_empty()) {
            log(&format!(
                "revision {}: version {version} (created {}; replaced {}; deleted {}) in {:.1} ms",
                head.revision,
                put.created.len(),
                put.replaced.len(),
                put.deleted.len(),
                // The whole write, its msync included: what the next
                // change waits for (the workers route by it before the msync).
                started.elapsed().as_secs_f64() * 1e3
            ));
        }
        owner::give_copy(self.store.path());
        self.status.set("following", "", head.revision);
        Ok(head.revision)
    }

    /// The upstream name of a key under the prefix, or `None` (logged)
    /// for a key that names none.
    fn name_of(&self, key: &[u8]) -> Option<String> {
        let shown = String::from_utf8_lossy(key);
        let name = key
            .strip_prefix(self.keys.as_bytes())
            .and_then(|n| std::str::from_utf8(n).ok());
        match name.map(|n| (n, check_name(n))) {
            Some((n, Ok(()))) => Some(n.to_owned()),
            Some((_, Err(why))) => {
                log(&format!("skipping key {shown}: {why}"));
                None
            }
            None => {
                log(&format!("skipping key {shown}: not an upstream name"));
                None
            }
        }
    }

    fn parse(&self, name: &str, kv: &Kv) -> Option<Upstream> {
        let key = String::from_utf8_lossy(&kv.key);
        let Ok(body) = std::str::from_utf8(&kv.value) else {
            log(&format!("skipping key {key}: its value is not UTF-8"));
            return None;
        };
        match parse_body(name, body) {
            Ok(u) => Some(u),
            Err(e) => {
                log(&format!("skipping key {key}: {e}"));
                None
            }
        }
    }
}

/// A pause of `BACKOFF_MIN * 2^(n-1)`, at most `BACKOFF_MAX`, of which a
/// random part is taken (full jitter), so a fleet's agents do not all call
/// the endpoint that came back at the same instant.
fn backoff(failures: u32) -> Duration {
    let ceiling = BACKOFF_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    // Hashing the clock with the pid gives each agent its own sequence.
    let mut x = nanos ^ (std::process::id() as u64) << 32;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    let half = ceiling / 2;
    half + Duration::from_nanos(x % (half.as_nanos() as u64).max(1))
}

fn log(line: &str) {
    eprintln!("dyups sync: {line}");
}

/// `PATH.sync`: what the agent is doing, for `dyups inspect` (and anyone
/// else) to read. Written whole (a temporary file renamed over it), 0644.
pub struct Status {
    path: PathBuf,
    last: Option<(String, String, u64)>,
}

impl Status {
    fn new(state: &Path) -> Status {
        Status {
            path: status_path(state),
            last: None,
        }
    }

    fn set(&mut self, state: &str, error: &str, revision: u64) {
        let now = (state.to_owned(), error.to_owned(), revision);
        if self.last.as_ref() == Some(&now) {
            return;
        }
        let text = serde_json::json!({
            "pid": std::process::id(),
            "state": state,
            "error": error,
            "revision": revision,
            "since": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
        .to_string();
        let tmp = self.path.with_extension("sync.tmp");
        let written = (|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            std::fs::rename(&tmp, &self.path)
        })();
        match written {
            Ok(()) => self.last = Some(now),
            Err(e) => log(&format!("could not write {}: {e}", self.path.display())),
        }
    }
}

/// Where the agent for the state file `state` reports.
pub fn status_path(state: &Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".sync");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_and_keeps_a_floor() {
        for n in 1..40 {
            let d = backoff(n);
            let ceiling = (BACKOFF_MIN * (1 << (n - 1).min(16))).min(BACKOFF_MAX);
            assert!(d >= ceiling / 2 && d <= ceiling, "{n}: {d:?}");
        }
    }
}
