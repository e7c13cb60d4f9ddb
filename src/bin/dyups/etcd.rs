//! The part of etcd's v3 API `dyups sync` needs, through the JSON gateway
//! every etcd 3.4 serves on its client URLs (`/v3/kv/range`, `/v3/watch`):
//! keys and values are base64, int64 fields are JSON strings. A blocking
//! HTTP client suffices (the agent is its own process), and the gateway
//! keeps the build free of protoc and gRPC (README, "Many hosts").

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Deserializer};

/// How long a range or probe may take. A member without quorum answers a
/// linearizable read only after about 7 s (with 503): well before that it
/// counts as unusable, and the agent tries the next endpoint.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Keys a range asks for at a time. One answer for a whole prefix grows
/// with the table (100,000 upstreams of 4 servers are some 23 MB of JSON):
/// past any fixed body limit, and past `CALL_TIMEOUT` on a busy member.
/// Pages of this many keys are some 235 KB for upstreams of 4 servers.
const RANGE_PAGE: u64 = 1000;

/// The largest answer read. A page of `RANGE_PAGE` upstreams of 1,000
/// servers each (the most an upstream takes) is about 60 MB of JSON.
const ANSWER_MAX: u64 = 256 << 20;

/// Why a call to etcd failed.
#[derive(Debug)]
pub enum Failure {
    /// Not reachable, too slow, or without quorum: try another endpoint
    /// later, change nothing.
    Unreachable(String),
    /// The revision asked for is compacted away: read everything again.
    Compacted(u64),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(why) => f.write_str(why),
            Failure::Compacted(rev) => write!(
                f,
                "required revision has been compacted (compact revision {rev})"
            ),
        }
    }
}

/// The header of every answer: which cluster, at which revision.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Header {
    #[serde(deserialize_with = "int64")]
    pub cluster_id: u64,
    #[serde(deserialize_with = "int64")]
    pub revision: u64,
}

/// One key and its value.
#[derive(Clone, Debug, Default)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: u64,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawKv {
    key: String,
    value: String,
    #[serde(deserialize_with = "int64")]
    mod_revision: u64,
}

impl RawKv {
    fn decode(self) -> Result<Kv, String> {
        Ok(Kv {
            key: B64
                .decode(&self.key)
                .map_err(|e| format!("key is not base64: {e}"))?,
            value: B64
                .decode(&self.value)
                .map_err(|e| format!("value is not base64: {e}"))?,
            mod_revision: self.mod_revision,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RangeAnswer {
    header: Header,
    kvs: Vec<RawKv>,
    /// More keys are in the range than this answer holds (`limit`).
    more: bool,
    // An error answer (HTTP 400/503...) instead.
    code: Option<i64>,
    message: Option<String>,
    error: Option<String>,
}

/// What a watch stream says, one message per response line.
#[derive(Debug)]
pub enum WatchMessage {
    /// The watch is in place (the first line).
    Created(Header),
    /// One response's events, in revision order.
    Events(Header, Vec<Event>),
    /// No events, but everything up to the header's revision was sent.
    Progress(Header),
    /// The start revision was compacted: read everything again.
    Compacted(u64),
    /// The stream ended or broke (the member went away, a bad line).
    Ended(String),
}

#[derive(Debug)]
pub enum Event {
    Put(Kv),
    Delete(Kv),
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct WatchLine {
    result: Option<WatchResult>,
    error: Option<serde_json::Value>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct WatchResult {
    header: Header,
    created: bool,
    canceled: bool,
    #[serde(deserialize_with = "int64")]
    compact_revision: u64,
    cancel_reason: String,
    events: Vec<RawEvent>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawEvent {
    // Absent for PUT: the gateway omits an enum's zero value.
    #[serde(rename = "type")]
    kind: Option<String>,
    kv: RawKv,
}

/// int64 fields come as strings ("42"), and are absent when zero.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Number(u64),
    }
    match Either::deserialize(d)? {
        Either::Number(n) => Ok(n),
        Either::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

/// The end of the range of keys under `prefix`: the prefix with its last
/// byte incremented, as etcdctl's `--prefix` does.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A client of one endpoint (`http://host:port`).
pub struct Endpoint {
    pub url: String,
    calls: ureq::Agent,
}

impl Endpoint {
    pub fn new(url: &str) -> Endpoint {
        let calls = ureq::Agent::config_builder()
            .timeout_global(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Endpoint {
            url: url.trim_end_matches('/').to_owned(),
            calls,
        }
    }

    /// Every key under `prefix` and the revision they are at. Linearizable:
    /// a member cut off from the quorum does not answer with stale data.
    /// Read in pages of `RANGE_PAGE` keys, every page after the first at the
    /// first one's revision, so together they are one revision's keys (a
    /// compaction past it meanwhile fails the read, which is then retried).
    pub fn range(&self, prefix: &[u8]) -> Result<(Header, Vec<Kv>), Failure> {
        let end = B64.encode(range_end(prefix));
        let mut from = prefix.to_vec();
        let mut head: Option<Header> = None;
        let mut kvs = Vec::new();
        loop {
            let mut body = serde_json::json!({
                "key": B64.encode(&from),
                "range_end": end,
                "limit": RANGE_PAGE.to_string(),
            });
            if let Some(h) = head {
                body["revision"] = h.revision.to_string().into();
            }
            let answer = self.range_call(body)?;
            let at = *head.get_or_insert(answer.header);
            let before = kvs.len();
            for raw in answer.kvs {
                kvs.push(
                    raw.decode()
                        .map_err(|e| self.unreachable(&format!("range: {e}")))?,
                );
            }
            match kvs[before..].last() {
                Some(last) if answer.more => {
                    // The next key after the last one read.
                    from.clone_from(&last.key);
                    from.push(0);
                }
                _ => return Ok((at, kvs)),
            }
        }
    }

    /// The cluster's id and current revision, by a linearizable count-only
    /// read of `prefix`: it fails on a member without quorum.
    pub fn probe(&self, prefix: &[u8]) -> Result<Header, Failure> {
        let answer = self.range_call(serde_json::json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(range_end(prefix)),
            "count_only": true,
        }))?;
        Ok(answer.header)
    }

    fn range_call(&self, body: serde_json::Value) -> Result<RangeAnswer, Failure> {
        let url = format!("{}/v3/kv/range", self.url);
        let mut response = self
            .calls
            .post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .map_err(|e| self.unreachable(&e.to_string()))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(ANSWER_MAX)
            .read_to_string()
            .map_err(|e| self.unreachable(&e.to_string()))?;
        let answer: RangeAnswer = serde_json::from_str(&text)
            .map_err(|e| self.unreachable(&format!("HTTP {status}, not etcd's JSON: {e}")))?;
        let message = answer.message.clone().or(answer.error.clone());
        if status != 200 || answer.code.is_some_and(|c| c != 0) {
            let message = message.unwrap_or_else(|| text.trim().to_owned());
            // gRPC OutOfRange (11): "required revision has been compacted".
            if answer.code == Some(11) || message.contains("compacted") {
                return Err(Failure::Compacted(0));
            }
            return Err(self.unreachable(&format!("HTTP {status}: {message}")));
        }
        Ok(answer)
    }

    fn unreachable(&self, why: &str) -> Failure {
        Failure::Unreachable(format!("etcd {}: {why}", self.url))
    }

    /// Watches every key under `prefix` from `start` on a thread of its
    /// own, which sends each response line to the returned channel. The
    /// thread ends when the stream does, or at its next line once the
    /// receiver is gone (a stream that fell silent is left to the agent's
    /// probes, which notice a member without quorum).
    pub fn watch(&self, prefix: &[u8], start: u64) -> mpsc::Receiver<WatchMessage> {
        let (tx, rx) = mpsc::channel();
        let url = format!("{}/v3/watch", self.url);
        let body = serde_json::json!({
            "create_request": {
                "key": B64.encode(prefix),
                "range_end": B64.encode(range_end(prefix)),
                "start_revision": start.to_string(),
                "progress_notify": true,
            }
        });
        let stream: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CALL_TIMEOUT))
            .timeout_recv_response(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        let name = self.url.clone();
        std::thread::spawn(move || {
            let ended = |why: String| WatchMessage::Ended(format!("etcd {name}: watch: {why}"));
            let response = match stream
                .post(&url)
                .header("content-type", "application/json")
                .send(body.to_string())
            {
                Ok(r) if r.status() == 200 => r,
                Ok(r) => {
                    let _ = tx.send(ended(format!("HTTP {}", r.status())));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(ended(e.to_string()));
                    return;
                }
            };
            let reader = BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let message = match line {
                    Ok(line) if line.trim().is_empty() => continue,
                    Ok(line) => parse_watch_line(&line).unwrap_or_else(ended),
                    Err(e) => ended(e.to_string()),
                };
                let last = matches!(message, WatchMessage::Ended(_) | WatchMessage::Compacted(_));
                if tx.send(message).is_err() || last {
                    return;
                }
            }
            let _ = tx.send(ended("the stream ended".into()));
        });
        rx
    }
}

fn parse_watch_line(line: &str) -> Result<WatchMessage, String> {
    let parsed: WatchLine =
        serde_json::from_str(line).map_err(|e| format!("not etcd's JSON ({e}): {line}"))?;
    if let Some(error) = parsed.error {
        return Err(error.to_string());
    }
    let r = parsed.result.ok_or_else(|| format!("no result: {line}"))?;
    if r.canceled {
        if r.compact_revision > 0 {
            return Ok(WatchMessage::Compacted(r.compact_revision));
        }
        return Err(format!("canceled: {}", r.cancel_reason));
    }
    if r.created {
        return Ok(WatchMessage::Created(r.header));
    }
    if r.events.is_empty() {
        return Ok(WatchMessage::Progress(r.header));
    }
    let mut events = Vec::with_capacity(r.events.len());
    for e in r.events {
        let kv = e.kv.decode()?;
        events.push(match e.kind.as_deref() {
            None | Some("PUT") => Event::Put(kv),
            Some("DELETE") => Event::Delete(kv),
            Some(other) => return Err(format!("unknown event type {other}")),
        });
    }
    Ok(WatchMessage::Events(r.header, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_is_the_prefix_plus_one() {
        assert_eq!(range_end(b"/dyups/upstreams/"), b"/dyups/upstreams0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff"), b"\0");
    }

    #[test]
    fn watch_lines_as_the_gateway_writes_them() {
        let created = r#"{"result":{"header":{"cluster_id":"14841639068965178418","member_id":"1","revision":"5","raft_term":"2"},"created":true}}"#;
        match parse_watch_line(created).unwrap() {
            WatchMessage::Created(h) => assert_eq!(
                h,
                Header {
                    cluster_id: 14841639068965178418,
                    revision: 5
                }
            ),
            other => panic!("{other:?}"),
        }
        let events = r#"{"result":{"header":{"revision":"7"},"events":[{"kv":{"key":"L2R5dXBzL3Vwc3RyZWFtcy9h","create_revision":"6","mod_revision":"6","version":"1","value":"c2VydmVyIDEuMi4zLjQ6ODA7"}},{"type":"DELETE","kv":{"key":"L2R5dXBzL3Vwc3RyZWFtcy9i","mod_revision":"7"}}]}}"#;
        match parse_watch_line(events).unwrap() {
            WatchMessage::Events(h, e) => {
                assert_eq!(h.revision, 7);
                assert!(
                    matches!(&e[0], Event::Put(kv) if kv.key == b"/dyups/upstreams/a" && kv.value == b"server 1.2.3.4:80;" && kv.mod_revision == 6)
                );
                assert!(matches!(&e[1], Event::Delete(kv) if kv.mod_revision == 7));
            }
            other => panic!("{other:?}"),
        }
        let compacted =
            r#"{"result":{"header":{"cluster_id":"1"},"canceled":true,"compact_revision":"9"}}"#;
        assert!(matches!(
            parse_watch_line(compacted).unwrap(),
            WatchMessage::Compacted(9)
        ));
        assert!(parse_watch_line(r#"{"error":{"grpc_code":14,"message":"unavailable"}}"#).is_err());
        assert!(parse_watch_line("not json").is_err());
    }
}
