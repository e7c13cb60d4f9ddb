//! What each fuzz target checks, as plain functions of the input bytes.
//!
//! The fuzz targets (`fuzz/fuzz_targets/*.rs`) call these, and so does the
//! main crate's `tests/fuzz_regressions.rs` (which includes this file with
//! `#[path]`), so every input saved under `fuzz/regressions/<target>/` is
//! replayed by `cargo test` through exactly the code that found it.
//!
//! A check panics (and so the fuzzer reports a crash) when the code under test
//! panics, or when a property below does not hold.

use std::sync::OnceLock;

use ngx_dyups::dns::wire::{self, Reply, SRV_RECORDS_MAX, TYPE_A, TYPE_AAAA, TYPE_SRV};
use ngx_dyups::dns::{combine, combine_service, service_records, service_targets};
use ngx_dyups::store::{inspect_image, Snapshot, StateFile, WriteOptions, MIN_FILE_LEN};
use ngx_dyups::table::model::{
    check_http_send, check_name, same_name, Address, ServerSpec, Table, FAIL_TIMEOUT_MAX,
    MAX_CONNS_MAX, MAX_FAILS_MAX, WEIGHT_MAX, WEIGHT_MIN,
};
use ngx_dyups::table::syntax::{
    parse_address, parse_body, parse_server_args, parse_server_patch, parse_servers,
    parse_upstream_file, render_server, render_upstream_file, server_lines, setting_lines,
};
use ngx_dyups::Error;

/// What a target runs on one input.
pub type Check = fn(&[u8]);

/// The fuzz targets, by the name of their directory under `fuzz/corpus/` and
/// `fuzz/regressions/`.
pub const TARGETS: [(&str, Check); 4] = [
    ("server_line", server_line),
    ("upstream_file", upstream_file),
    ("state_file", state_file),
    ("dns_reply", dns_reply),
];

// ---------------------------------------------------------------------------
// dns_reply
// ---------------------------------------------------------------------------

/// A DNS reply from the network, to the query for A, AAAA or SRV records
/// (the first byte picks) of a fixed name: `wire::read_reply` on the rest
/// as it is, and again with the query's id, question and the reply flag
/// put in front of the rest (so that the answers are reached): no panic;
/// what it accepts has records of the type asked only, SRV records
/// bounded, with a port and a weight, and makes a lookup without panic.
pub fn dns_reply(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let qtype = [TYPE_A, TYPE_AAAA, TYPE_SRV][usize::from(pick % 3)];
    let name = if qtype == TYPE_SRV {
        "_http._tcp.svc.internal"
    } else {
        "app.internal"
    };
    let q = wire::query(0x5157, name, qtype);
    let mut spliced = q.clone();
    // QR set, RD kept; the rcode and TC from the input's first byte.
    let flags = 0x8100 | u16::from(pick >> 2 & 0x0f) | u16::from(pick & 0x80 != 0) << 9;
    spliced[2..4].copy_from_slice(&flags.to_be_bytes());
    let answers = rest.first().map_or(0, |&n| u16::from(n % 80));
    spliced[6..8].copy_from_slice(&answers.to_be_bytes());
    spliced.extend_from_slice(rest.get(1..).unwrap_or_default());
    for reply in [rest, &spliced[..]] {
        let r = wire::read_reply(&q, reply);
        check_reply(name, qtype, &r);
        if qtype == TYPE_SRV {
            if let Ok((records, ttl)) = service_records(name, r) {
                let targets: Vec<_> = service_targets(&records)
                    .into_iter()
                    .map(|t| (t.clone(), combine(&t, &[Ok(Reply::NoSuchName)])))
                    .collect();
                let _ = combine_service(name, &records, ttl, &targets);
            }
        } else {
            let _ = combine(name, &[r]);
        }
    }
}

fn check_reply(name: &str, qtype: u16, r: &Result<Reply, String>) {
    match r {
        Ok(Reply::Records { addrs, ttl }) => {
            assert_ne!(qtype, TYPE_SRV, "{name}: addresses to an SRV query");
            assert!(addrs.iter().all(|a| a.is_ipv4() == (qtype == TYPE_A)));
            assert!(*ttl <= i32::MAX as u32);
        }
        Ok(Reply::Services { records, ttl }) => {
            assert_eq!(qtype, TYPE_SRV, "{name}: SRV records to an address query");
            assert!(records.len() <= SRV_RECORDS_MAX);
            assert!(records.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
            assert!(records.iter().all(|r| r.port != 0 && r.weight >= 1));
            assert!(*ttl <= i32::MAX as u32);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// server_line
// ---------------------------------------------------------------------------

/// `parse_server_args`, `parse_address`, `parse_server_patch` and
/// `parse_body` on the input (lossy UTF-8): no panic; what they accept is
/// in range and reads back the same after `render_server`; what
/// `parse_servers` refuses it says where (`line N: ...`).
pub fn server_line(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse_address(&text);
    let _ = parse_server_patch(&text);

    if let Ok(spec) = parse_server_args(&text) {
        check_server(&spec, &text);
        let line = render_server(&spec);
        let args = line
            .strip_prefix("server ")
            .and_then(|l| l.strip_suffix(';'));
        let back = args.map(parse_server_args);
        assert_eq!(
            back,
            Some(Ok(spec.clone())),
            "{text:?} -> {line:?} reads back differently"
        );
        // A body of backups only is refused, as nginx refuses it.
        match parse_servers(&line) {
            Ok(back) => assert_eq!(back, [spec], "{text:?} -> {line:?} reads back differently"),
            Err(e) => assert!(
                spec.backup && e.to_string().contains("only backup servers"),
                "{text:?} parsed, its rendering {line:?} does not: {e}"
            ),
        }
    }

    // A body is read as an upstream: its servers at addresses and its
    // `server NAME` lines (a body of names only is a body with servers).
    match parse_body("body", &text) {
        Ok(u) => {
            assert!(
                !(u.servers.is_empty() && u.names.is_empty()),
                "{text:?}: Ok with no server and no name"
            );
            for s in &u.servers {
                check_server(s, &text);
            }
            assert!(
                u.has_primary(),
                "{text:?}: a body of backups only was accepted"
            );
            let body: String = setting_lines(&u)
                .into_iter()
                .chain(server_lines(&u))
                .collect();
            let back = parse_body("body", &body).unwrap_or_else(|e| {
                panic!("{text:?} parsed, its rendering {body:?} does not: {e}")
            });
            assert_eq!(back, u, "{text:?} -> {body:?} reads back differently");
        }
        Err(e) => check_body_error(&e, &text),
    }
}

/// `parse_body` refuses a body naming the line, except for a body with no
/// statement at all, which has no line to name.
pub fn check_body_error(e: &Error, text: &str) {
    let Error::BadRequest(msg) = e else {
        panic!("{text:?}: parse_servers failed with a non-400 error: {e:?}");
    };
    if msg.starts_with("no server in body") {
        return;
    }
    check_line_prefix(msg, text);
}

/// `line N: ...` with 1 <= N <= the number of lines in `text`.
pub fn check_line_prefix(msg: &str, text: &str) {
    let n = msg
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(n, _)| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{text:?}: error {msg:?} does not start with `line N:`"));
    let lines = text.split('\n').count();
    assert!(
        (1..=lines).contains(&n),
        "{text:?}: error {msg:?} names line {n}, the text has {lines}"
    );
}

fn check_server(s: &ServerSpec, text: &str) {
    assert!(
        (WEIGHT_MIN..=WEIGHT_MAX).contains(&s.weight)
            && s.max_conns <= MAX_CONNS_MAX
            && s.max_fails <= MAX_FAILS_MAX
            && s.fail_timeout <= FAIL_TIMEOUT_MAX,
        "{text:?}: out-of-range server accepted: {s:?}"
    );
    match &s.addr {
        Address::Inet(a) => assert_ne!(a.port(), 0, "{text:?}: port 0 accepted"),
        Address::Unix(p) => assert!(p.starts_with('/'), "{text:?}: relative unix path {p:?}"),
    }
}

// ---------------------------------------------------------------------------
// upstream_file
// ---------------------------------------------------------------------------

/// `parse_upstream_file` on the input (lossy UTF-8): no panic; a refusal
/// names its line; an accepted table is valid and survives
/// `render_upstream_file` then `parse_upstream_file` unchanged.
pub fn upstream_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_upstream_file(&text) {
        Ok(table) => {
            check_table(&table, &text);
            let rendered = render_upstream_file(&table);
            let back = parse_upstream_file(&rendered).unwrap_or_else(|e| {
                panic!("{text:?} parsed, its rendering {rendered:?} does not: {e}")
            });
            assert_eq!(
                back, table,
                "{text:?} -> {rendered:?} reads back differently"
            );
        }
        Err(Error::BadRequest(msg)) => check_line_prefix(&msg, &text),
        Err(e) => panic!("{text:?}: parse_upstream_file failed with a non-400 error: {e:?}"),
    }
}

fn check_table(t: &Table, text: &str) {
    for (i, u) in t.upstreams.iter().enumerate() {
        check_name(&u.name).unwrap_or_else(|e| panic!("{text:?}: bad name accepted: {e}"));
        assert!(
            t.upstreams[..i]
                .iter()
                .all(|o| !same_name(&o.name, &u.name)),
            "{text:?}: upstream {} twice",
            u.name
        );
        assert!(
            u.has_primary(),
            "{text:?}: upstream {} has no server or only backups",
            u.name
        );
        check_http_send(&u.check.http_send)
            .unwrap_or_else(|e| panic!("{text:?}: bad check_http_send accepted: {e}"));
        for (j, s) in u.servers.iter().enumerate() {
            check_server(s, text);
            assert!(
                u.servers[..j].iter().all(|o| o.addr != s.addr),
                "{text:?}: server {} twice in {}",
                s.addr,
                u.name
            );
        }
    }
}

// ---------------------------------------------------------------------------
// state_file
// ---------------------------------------------------------------------------

/// Inputs that start with this byte are a mutation script applied to a valid
/// image (see [`mutate`]); any other input is a state file image as it is.
/// Real images start with 0x89.
pub const SCRIPT: u8 = b'M';

/// `inspect_image` on the input as a whole image, or on a valid image mutated
/// by the input: no panic; a snapshot it returns is consistent and valid.
pub fn state_file(data: &[u8]) {
    match data.split_first() {
        Some((&SCRIPT, script)) => {
            check_image(&mutate(script));
        }
        _ => {
            check_image(data);
        }
    }
}

/// Checks one image: `inspect_image` returns a valid snapshot or an error
/// naming the file, and never panics.
pub fn check_image(image: &[u8]) -> Option<Snapshot> {
    match inspect_image(image, "fuzz-image") {
        Ok(s) => {
            assert!(
                s.version <= s.seen,
                "table version {} above the commit word's {}",
                s.version,
                s.seen
            );
            if s.fallback.is_none() {
                assert_eq!(s.version, s.seen, "active slot at another version");
            } else {
                assert!(s.version < s.seen, "fallback to a table that is not older");
            }
            for (i, u) in s.table.upstreams.iter().enumerate() {
                check_name(&u.name).unwrap_or_else(|e| panic!("bad name decoded: {e}"));
                assert!(
                    s.table.upstreams[..i].iter().all(|o| o.name != u.name),
                    "upstream {} decoded twice",
                    u.name
                );
                for srv in &u.servers {
                    check_server(srv, "<image>");
                }
            }
            Some(s)
        }
        Err(e) => {
            assert!(
                e.to_string().contains("fuzz-image"),
                "error does not name the file: {e}"
            );
            None
        }
    }
}

/// A valid state image of the smallest size (`MIN_FILE_LEN`): both slots
/// hold a table (versions 2 and 3, slot 0 active), the change log is not
/// empty. Made once per process through the public `StateFile` API.
pub fn valid_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| build_image().expect("could not build the valid state image"))
}

fn build_image() -> Result<Vec<u8>, Error> {
    let dir = std::env::temp_dir().join(format!("ngx-dyups-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::Internal(e.to_string()))?;
    let path = dir.join("state");
    let _ = std::fs::remove_file(&path);
    let image = (|| {
        let seed = || {
            parse_upstream_file(
                "upstream local { server 127.0.0.1:8088 weight=3 max_conns=7 max_fails=2 fail_timeout=5s slow_start=20s; \
                 server [::1]:8089 backup; check interval=3000 rise=2 fall=5 timeout=1000 type=http; \
                 check_http_send \"HEAD / HTTP/1.0\\r\\n\\r\\n\"; keepalive_timeout 30s; }\n\
                 upstream sock { server unix:/run/app.sock down; server 10.0.0.1; }\n",
            )
        };
        let store = StateFile::open(&path, MIN_FILE_LEN, seed)?;
        let opts = WriteOptions {
            durable: false,
            ..WriteOptions::default()
        };
        store.write(&opts, |t| {
            ngx_dyups::admin::ops::update(t, "dyhost", "server 127.0.0.2:81; server 127.0.0.3:82;")
        })?;
        store.write(&opts, |t| {
            ngx_dyups::admin::ops::remove_server(t, Some("dyhost"), "127.0.0.2:81").map(drop)
        })?;
        std::fs::read(&path).map_err(|e| Error::Internal(e.to_string()))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    image
}

// Layout facts (src/store/layout.rs) the mutator needs to fix checksums.
const HEADER_LEN: usize = 4096;
const HEADER_CRC_AT: usize = 36;
const SLOT_LEN_AT: usize = 16;
const SLOT_HEADER: usize = 32;

/// Applies a mutation script to [`valid_image`]:
///
/// ```text
/// byte 0      flags: 1 = recompute both slots' CRCs afterwards,
///                    2 = recompute the header CRC afterwards,
///                    4 = truncate the image to (bytes 1..3 as u16 LE) % len,
///                        (those two bytes are then not edits)
/// then        edits of 3 bytes: offset u16 LE (mod image length), xor byte
/// ```
///
/// With flag 1 the slots' checksums match their (mutated) payloads, so the
/// mutation reaches the payload decoder instead of stopping at the CRC.
pub fn mutate(script: &[u8]) -> Vec<u8> {
    let mut image = valid_image().to_vec();
    let Some((&flags, mut edits)) = script.split_first() else {
        return image;
    };
    let mut truncate_to = None;
    if flags & 4 != 0 && edits.len() >= 2 {
        truncate_to = Some(u16::from_le_bytes([edits[0], edits[1]]) as usize % image.len());
        edits = &edits[2..];
    }
    for e in edits.chunks_exact(3) {
        let at = u16::from_le_bytes([e[0], e[1]]) as usize % image.len();
        image[at] ^= e[2];
    }
    if flags & 2 != 0 {
        let crc = crc32fast::hash(&image[..HEADER_CRC_AT]);
        image[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    if flags & 1 != 0 {
        fix_slot_crcs(&mut image);
    }
    if let Some(n) = truncate_to {
        image.truncate(n);
    }
    image
}

/// Recomputes each slot's CRCs: the base's over its (generation, length)
/// and as much payload as the length claims, the extension's over the
/// generation and the extension (0 for none), when they fit in the slot.
pub fn fix_slot_crcs(image: &mut [u8]) {
    let slot_len = u64_at(image, SLOT_LEN_AT) as usize;
    if slot_len < SLOT_HEADER || slot_len > image.len() {
        return;
    }
    for i in 0..2 {
        let off = HEADER_LEN + i * slot_len;
        if off + slot_len > image.len() {
            return;
        }
        let len = u64_at(image, off + 8);
        let ext_len = u64::from(u32_at(image, off + 20));
        if len + ext_len > (slot_len - SLOT_HEADER) as u64 {
            continue;
        }
        let start = off + SLOT_HEADER;
        let mut h = crc32fast::Hasher::new();
        h.update(&image[off..off + 16]);
        h.update(&image[start..start + len as usize]);
        let crc = h.finalize();
        image[off + 16..off + 20].copy_from_slice(&crc.to_le_bytes());
        let ext = start + len as usize..start + (len + ext_len) as usize;
        let ext_crc = if ext.is_empty() {
            0
        } else {
            let mut h = crc32fast::Hasher::new();
            h.update(&image[off..off + 8]);
            h.update(&image[ext]);
            h.finalize()
        };
        image[off + 24..off + 28].copy_from_slice(&ext_crc.to_le_bytes());
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
