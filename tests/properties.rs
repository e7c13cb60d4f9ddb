//! Property tests (proptest) of the parsers, the state file loader and the
//! table operations. Case counts are kept small so `cargo test` stays fast;
//! the fuzz targets (fuzz/, `make fuzz`) search the same ground for longer.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ngx_dyups::admin::ops;
use ngx_dyups::store::inspect_image;
use ngx_dyups::table::model::{
    check_http_send, Address, CheckLine, CheckSettings, CheckType, ExpectAlive, ServerSpec, Table,
    Upstream, CHECK_COUNT_MAX, CHECK_TIME_MAX, FAIL_TIMEOUT_MAX, MAX_CONNS_MAX, MAX_FAILS_MAX,
    SLOW_START_MAX, WEIGHT_MAX, WEIGHT_MIN,
};
use ngx_dyups::table::policy::Policy;
use ngx_dyups::table::syntax::{
    parse_server_args, parse_server_patch, parse_servers, parse_upstream_file, render_upstream_file,
};
use ngx_dyups::Error;
use proptest::prelude::*;

#[path = "../fuzz/src/checks.rs"]
#[allow(dead_code)]
mod checks;

/// A number no two cases of this process share.
fn rand_suffix() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._-]{1,24}",
        "[a-z]{1,3}",
        // Names at the length limit.
        "[a-z]{255}",
    ]
    .prop_filter("only dots", |n| !n.bytes().all(|b| b == b'.'))
}

fn address() -> impl Strategy<Value = Address> {
    prop_oneof![
        (any::<[u8; 4]>(), 1..=u16::MAX)
            .prop_map(|(ip, port)| Address::Inet(SocketAddr::from((Ipv4Addr::from(ip), port)))),
        (any::<[u8; 16]>(), 1..=u16::MAX)
            .prop_map(|(ip, port)| Address::Inet(SocketAddr::from((Ipv6Addr::from(ip), port)))),
        // Loopback-ish and mapped IPv6 spellings.
        (
            prop_oneof![
                Just(Ipv6Addr::LOCALHOST),
                Just("::ffff:1.2.3.4".parse().unwrap())
            ],
            1..=u16::MAX
        )
            .prop_map(|(ip, port)| Address::Inet(SocketAddr::from((ip, port)))),
        "/[a-zA-Z0-9._/#}\"'$-]{0,100}".prop_map(Address::Unix),
        "/[^\\p{Cc}\\s;{\\\\]{0,25}".prop_map(Address::Unix),
    ]
}

fn server() -> impl Strategy<Value = ServerSpec> {
    (
        address(),
        WEIGHT_MIN..=WEIGHT_MAX,
        prop_oneof![Just(0), 0..=MAX_CONNS_MAX],
        0..=MAX_FAILS_MAX,
        0..=FAIL_TIMEOUT_MAX,
        prop_oneof![Just(0), 0..=SLOW_START_MAX],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(addr, weight, max_conns, max_fails, fail_timeout, slow_start, backup, down)| {
                ServerSpec {
                    addr,
                    weight,
                    max_conns,
                    max_fails,
                    fail_timeout,
                    slow_start,
                    backup,
                    down,
                    from: None,
                }
            },
        )
}

fn check_line() -> impl Strategy<Value = CheckLine> {
    (
        (1..=CHECK_TIME_MAX, 1..=CHECK_COUNT_MAX, 1..=CHECK_COUNT_MAX),
        (
            1..=CHECK_TIME_MAX,
            any::<bool>(),
            prop::sample::select(CheckType::ALL.to_vec()),
        ),
        (any::<u16>(), 0..=CHECK_TIME_MAX),
    )
        .prop_map(
            |((interval, rise, fall), (timeout, default_down, kind), (port, jitter))| CheckLine {
                interval,
                rise,
                fall,
                timeout,
                default_down,
                kind,
                port,
                jitter,
            },
        )
}

/// Requests with what could break a line or a quoted string: quotes,
/// backslashes, CR, LF, tab, braces, `;`, `#`, `$`, and any other text.
fn http_send() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\"\\\\\r\n\t{};#$' a-z]{1,30}",
        "\\PC{1,20}",
        Just("GET / HTTP/1.0\r\n\r\n".to_string()),
    ]
    .prop_filter("a valid request", |s| check_http_send(s).is_ok())
}

fn check_settings() -> impl Strategy<Value = CheckSettings> {
    (
        prop::option::of(check_line()),
        http_send(),
        1..16u8,
        1..=1_000_000u32,
    )
        .prop_map(
            |(line, http_send, bits, keepalive_requests)| CheckSettings {
                line,
                http_send,
                http_expect_alive: ExpectAlive::from_bits(bits).unwrap(),
                keepalive_requests,
            },
        )
}

fn upstream() -> impl Strategy<Value = Upstream> {
    (
        name(),
        prop::collection::vec(server(), 1..6),
        prop::option::weighted(0.5, check_settings()),
        prop::option::weighted(
            0.3,
            (
                any::<u32>(),
                0..=i32::MAX as u32,
                0..=i32::MAX as u32,
                0..=65535u32,
            ),
        ),
        any::<bool>(),
    )
        .prop_map(|(name, mut servers, check, keepalive, least_conn)| {
            let mut seen = Vec::new();
            servers.retain(|s| {
                let new = !seen.contains(&s.addr);
                seen.push(s.addr.clone());
                new
            });
            // nginx refuses an upstream of backups only.
            servers[0].backup = false;
            let mut u = Upstream::new(name, servers);
            if let Some(check) = check {
                u.check = check;
            }
            if let Some((requests, time, timeout, n)) = keepalive {
                u.keepalive_requests = requests;
                u.keepalive_time = time;
                u.keepalive_timeout = timeout;
                u.keepalive = n;
            }
            if least_conn {
                u.policy = Policy::LeastConn;
            }
            u
        })
}

fn table() -> impl Strategy<Value = Table> {
    prop::collection::vec(upstream(), 0..6).prop_map(|ups| {
        let mut t = Table::default();
        for u in ups {
            if t.get(&u.name).is_none() {
                t.upstreams.push(u.into());
            }
        }
        t
    })
}

/// Text made of the tokens the parsers care about, so that random strings
/// get past the first word.
fn nginxish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("server".to_string()),
        Just("upstream".to_string()),
        Just(";".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(" ".to_string()),
        Just("\n".to_string()),
        Just("#".to_string()),
        Just("\"".to_string()),
        Just("'".to_string()),
        Just("\\".to_string()),
        Just("balancer_by_lua_block".to_string()),
        Just("--[[".to_string()),
        Just("]]".to_string()),
        Just("127.0.0.1:8088".to_string()),
        Just("[::1]:80".to_string()),
        Just("unix:/tmp/s".to_string()),
        Just("weight=3".to_string()),
        Just("fail_timeout=1m30s".to_string()),
        Just("backup".to_string()),
        Just("down".to_string()),
        "[a-z0-9=:./_-]{1,8}",
        "\\PC{1,4}",
    ];
    prop::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

// ---------------------------------------------------------------------------
// (1) render then parse gives the table back
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn rendered_tables_parse_back_the_same(t in table()) {
        let text = render_upstream_file(&t);
        let back = parse_upstream_file(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(back, t, "{}", text);
    }

    /// Every setting, through the state file: written into a new file's
    /// slot (base and extension) and read back.
    #[test]
    fn tables_survive_the_state_file(t in table()) {
        let dir = std::env::temp_dir().join(format!(
            "dyups-prop-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let made = ngx_dyups::store::StateFile::open_detached(&path, 1 << 20, || Ok(t.clone()));
        let read = made.and_then(|()| {
            let image = std::fs::read(&path).map_err(|e| Error::Internal(e.to_string()))?;
            inspect_image(&image, "state")
        });
        let _ = std::fs::remove_dir_all(&dir);
        let snap = read.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(snap.table.upstreams.len(), t.upstreams.len());
        for (back, u) in snap.table.upstreams.iter().zip(&t.upstreams) {
            prop_assert!(back.same_content(u), "{:?}\nread back as\n{:?}", u, back);
        }
    }

    #[test]
    fn a_parsed_server_line_renders_back_the_same(s in server()) {
        let line = ngx_dyups::table::syntax::render_server(&s);
        let args = line.strip_prefix("server ").unwrap().strip_suffix(';').unwrap();
        prop_assert_eq!(parse_server_args(args), Ok(s.clone()), "{}", line);
        // A body of backups only is refused: give it a primary to lean on.
        // (No generated address has a path this long.)
        let primary = format!("server unix:/{};", "p".repeat(105));
        let body = if s.backup { format!("{line} {primary}") } else { line.clone() };
        let back = parse_servers(&body).map_err(|e| e.to_string());
        prop_assert_eq!(back.map(|b| b[0].clone()), Ok(s), "{}", body);
    }
}

// ---------------------------------------------------------------------------
// (2) the parsers never panic; every refusal names its line
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn parse_servers_never_panics_and_names_the_line(text in prop_oneof!["\\PC*", ".*", nginxish()]) {
        match parse_servers(&text) {
            Ok(servers) => prop_assert!(!servers.is_empty()),
            Err(e) => checks::check_body_error(&e, &text),
        }
        let _ = parse_server_args(&text);
        let _ = parse_server_patch(&text);
    }

    #[test]
    fn the_fuzz_checks_hold_for_nginxish_text(text in nginxish()) {
        checks::server_line(text.as_bytes());
        checks::upstream_file(text.as_bytes());
    }
}

#[test]
fn an_empty_body_is_refused_without_a_line() {
    // The one refusal that names no line: there is no statement to point at.
    for body in ["", "  \n", "# only a comment\n"] {
        let e = parse_servers(body).unwrap_err();
        assert!(e.to_string().starts_with("no server in body"), "{e}");
    }
}

// ---------------------------------------------------------------------------
// (3) a corrupted state image: a snapshot or an error, never a panic, and
// never the corrupted table
// ---------------------------------------------------------------------------

const HEADER_LEN: usize = 4096;
const SLOT_HEADER: usize = 32;

struct Image {
    bytes: &'static [u8],
    /// The table of the active slot (slot 0, version 3) and of the other
    /// (slot 1, version 2): what a reader falls back to.
    active: Table,
    fallback: Table,
    /// Bytes of the active slot's header fields (generation, lengths, CRCs)
    /// and payload (base and extension): a change there must never go
    /// unnoticed.
    active_checked: std::ops::Range<usize>,
    slot_reserved: std::ops::Range<usize>,
}

fn image() -> Image {
    let bytes = checks::valid_image();
    let snap = inspect_image(bytes, "image").unwrap();
    assert_eq!((snap.version, snap.fallback.as_deref()), (3, None));
    // The same image with the commit word naming slot 1 at version 2.
    let mut other = bytes.to_vec();
    other[64..72].copy_from_slice(&(2u64 << 1 | 1).to_ne_bytes());
    let prev = inspect_image(&other, "image").unwrap();
    assert_eq!(prev.version, 2);
    assert_ne!(prev.table, snap.table);
    let len = u64::from_le_bytes(bytes[HEADER_LEN + 8..HEADER_LEN + 16].try_into().unwrap());
    let ext_len = u32::from_le_bytes(bytes[HEADER_LEN + 20..HEADER_LEN + 24].try_into().unwrap());
    assert!(ext_len > 0, "the image has no extension to corrupt");
    Image {
        bytes,
        active: snap.table,
        fallback: prev.table,
        active_checked: HEADER_LEN..HEADER_LEN + SLOT_HEADER + len as usize + ext_len as usize,
        slot_reserved: HEADER_LEN + 28..HEADER_LEN + SLOT_HEADER,
    }
}

/// What one corrupted image must give.
fn check_corrupted(img: &Image, at: usize, xor: u8) -> Result<(), String> {
    let mut bytes = img.bytes.to_vec();
    bytes[at] ^= xor;
    let result = inspect_image(&bytes, "image");
    let in_active = img.active_checked.contains(&at) && !img.slot_reserved.contains(&at);
    match result {
        Err(e) if e.to_string().contains("image") => Ok(()),
        Err(e) => Err(format!(
            "byte {at}^{xor:#x}: error does not name the file: {e}"
        )),
        Ok(s) if in_active => {
            if s.fallback.is_some() && s.version == 2 && s.table == img.fallback {
                Ok(())
            } else {
                Err(format!(
                    "byte {at}^{xor:#x} in the active slot: got version {} (fallback {:?}), \
                     not the previous table or an error",
                    s.version, s.fallback
                ))
            }
        }
        Ok(s) if s.table == img.active || s.table == img.fallback => Ok(()),
        Ok(s) => Err(format!(
            "byte {at}^{xor:#x}: a table that is in neither slot: {:?}",
            s.table
        )),
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn one_corrupted_byte_gives_a_snapshot_or_an_error(
        pick in prop_oneof![
            // Anywhere, the header, the active slot, the other slot.
            0..12_288usize,
            0..200usize,
            HEADER_LEN..HEADER_LEN + 400,
            HEADER_LEN + 4096..HEADER_LEN + 4096 + 400,
        ],
        xor in 1..=255u8,
    ) {
        let img = image();
        prop_assert_eq!(img.bytes.len(), 12_288);
        check_corrupted(&img, pick, xor).map_err(TestCaseError::fail)?;
    }
}

/// Every single-bit flip of the whole image, exhaustively (about 100 000).
#[test]
fn every_single_bit_flip_gives_a_snapshot_or_an_error() {
    let img = image();
    let mut bad = Vec::new();
    for at in 0..img.bytes.len() {
        for bit in 0..8 {
            if let Err(e) = check_corrupted(&img, at, 1 << bit) {
                bad.push(e);
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} bad flips, first: {:#?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

/// With its CRC recomputed, a corrupted payload reaches the decoder, which
/// must refuse it or decode a valid table (the fuzz target's check).
#[test]
fn corrupted_payloads_with_good_checksums_reach_the_decoder_safely() {
    let img = image();
    for at in img.active_checked.start + SLOT_HEADER..img.active_checked.end {
        for xor in [0x01, 0x80, 0xff] {
            let mut bytes = img.bytes.to_vec();
            bytes[at] ^= xor;
            checks::fix_slot_crcs(&mut bytes);
            checks::check_image(&bytes);
        }
    }
}

// ---------------------------------------------------------------------------
// (4) a failed operation leaves the table as it was
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Update(String, String),
    Delete(String),
    AddServer(Option<String>, String),
    RemoveServer(Option<String>, String),
    InsertServer(String, String),
    PatchServer(String, String, String),
    DeleteServer(String, String),
}

fn op_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["", "bad name", "..", "x/y"]).prop_map(str::to_owned),
    ]
}

fn op_addr() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "127.0.0.1:8001",
            "127.0.0.1:8002",
            "127.0.0.1:8003",
            "[::1]:8001",
            "unix:/tmp/s.sock",
        ])
        .prop_map(str::to_owned),
        1 => prop::sample::select(vec!["127.0.0.1:0", "example.com", "::1", "unix:rel", ""])
            .prop_map(str::to_owned),
    ]
}

fn op_params() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "",
        " weight=2",
        " backup",
        " down",
        " max_fails=0 fail_timeout=1m",
        " max_conns=3",
        " weight=0",
        " down down",
        " bogus",
    ])
    .prop_map(str::to_owned)
}

fn op_server() -> impl Strategy<Value = String> {
    (op_addr(), op_params(), any::<bool>()).prop_map(|(a, p, line)| {
        if line {
            format!("server {a}{p};")
        } else {
            format!("{a}{p}")
        }
    })
}

fn op_body() -> impl Strategy<Value = String> {
    prop::collection::vec((op_addr(), op_params()), 0..4).prop_map(|servers| {
        servers
            .into_iter()
            .map(|(a, p)| format!("server {a}{p};\n"))
            .collect()
    })
}

fn op() -> impl Strategy<Value = Op> {
    let maybe_name = || prop::option::weighted(0.7, op_name());
    prop_oneof![
        3 => (op_name(), op_body()).prop_map(|(n, b)| Op::Update(n, b)),
        1 => op_name().prop_map(Op::Delete),
        2 => (maybe_name(), op_server()).prop_map(|(n, s)| Op::AddServer(n, s)),
        2 => (maybe_name(), op_addr()).prop_map(|(n, s)| Op::RemoveServer(n, s)),
        1 => (op_name(), op_server()).prop_map(|(n, s)| Op::InsertServer(n, s)),
        1 => (op_name(), op_addr(), prop::sample::select(vec![
            "down", "down=off", "backup=on weight=5", "weight=0", "", "max_fails=7", "max_conns=2",
            "weight=2;",
        ]).prop_map(str::to_owned)).prop_map(|(n, s, p)| Op::PatchServer(n, s, p)),
        1 => (op_name(), op_addr()).prop_map(|(n, s)| Op::DeleteServer(n, s)),
    ]
}

fn apply(t: &mut Table, op: &Op) -> Result<(), Error> {
    match op {
        Op::Update(n, b) => ops::update(t, n, b),
        Op::Delete(n) => ops::delete(t, n),
        Op::AddServer(n, s) => ops::add_server(t, n.as_deref(), s).map(drop),
        Op::RemoveServer(n, s) => ops::remove_server(t, n.as_deref(), s).map(drop),
        Op::InsertServer(n, s) => ops::insert_server(t, n, s),
        Op::PatchServer(n, s, p) => {
            let patch = parse_server_patch(p).map_err(Error::BadRequest)?;
            ops::patch_server(t, n, s, &patch)
        }
        Op::DeleteServer(n, s) => ops::delete_server(t, n, s),
    }
}

/// Names unique, addresses unique within an upstream, parameters in range.
fn check_invariants(t: &Table) -> Result<(), String> {
    for (i, u) in t.upstreams.iter().enumerate() {
        if t.upstreams[..i].iter().any(|o| o.name == u.name) {
            return Err(format!("upstream {} twice", u.name));
        }
        for (j, s) in u.servers.iter().enumerate() {
            if u.servers[..j].iter().any(|o| o.addr == s.addr) {
                return Err(format!("server {} twice in {}", s.addr, u.name));
            }
            if !(WEIGHT_MIN..=WEIGHT_MAX).contains(&s.weight)
                || s.max_conns > MAX_CONNS_MAX
                || s.max_fails > MAX_FAILS_MAX
                || s.fail_timeout > FAIL_TIMEOUT_MAX
            {
                return Err(format!("server {s:?} out of range"));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_failed_op_leaves_the_table_unchanged(ops in prop::collection::vec(op(), 1..30)) {
        let mut t = Table::default();
        for op in &ops {
            let before = t.clone();
            match apply(&mut t, op) {
                Err(e) => prop_assert_eq!(&t, &before, "{:?} failed ({}) and changed the table", op, e),
                Ok(()) => {
                    check_invariants(&t).map_err(|e| TestCaseError::fail(format!("after {op:?}: {e}")))?;
                    // Taking servers out never empties an upstream's rotation.
                    if matches!(op, Op::RemoveServer(..) | Op::PatchServer(..) | Op::DeleteServer(..)) {
                        for u in &before.upstreams {
                            let after = t.get(&u.name).map_or(0, Upstream::in_rotation);
                            prop_assert!(
                                u.in_rotation() == 0 || after > 0,
                                "{:?} left {} with no server in rotation", op, u.name
                            );
                        }
                    }
                }
            }
            // Whatever the ops did, the table still renders to a file that
            // reads back the same (upstreams with servers only).
            if t.upstreams.iter().all(|u| !u.servers.is_empty()) {
                let text = render_upstream_file(&t);
                let back = parse_upstream_file(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
                prop_assert_eq!(&back, &t);
            }
        }
    }
}
