//! The `dyups` binary run as a user runs it, on state files in a temporary
//! directory (no nginx: spec/cli_spec.lua runs it against one): each exit
//! code, that stderr names the file and the reason, and that a refused
//! command leaves every file as it was.

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("dyups-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Every file here with its bytes: what a refused command must not
    /// change.
    fn contents(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// [`contents`](Self::contents), but a state file without the writers'
    /// queue and flush mark (bytes 72..128), which every write attempt
    /// moves, refused or not.
    fn tables(&self) -> Vec<(String, Vec<u8>)> {
        let mut v = self.contents();
        for (_, bytes) in &mut v {
            // The writers' queue and the table's counters (72..512) move
            // with every write, refused or not.
            if bytes.starts_with(b"\x89DYUPS\r\n") && bytes.len() >= 512 {
                bytes[72..512].fill(0);
            }
        }
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dyups(args: &[&str]) -> Output {
    dyups_with_input(args, None)
}

fn dyups_with_input(args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dyups"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two upstreams, one with what the state file keeps in a slot's extension
/// (a check line, max_conns), as `dump` writes them.
const TWO: &str = "upstream a {\n    server 127.0.0.1:81;\n}\n\nupstream b {\n    least_conn;\n    check interval=3000 rise=2 fall=5 timeout=1000 type=http;\n    server 127.0.0.1:82 weight=3 max_conns=5 max_fails=2;\n    server unix:/run/b.sock backup;\n}\n";

#[test]
fn usage_mistakes_exit_2_and_help_exits_0() {
    let o = dyups(&[]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("usage: dyups COMMAND"),
        "{}",
        stderr(&o)
    );
    let o = dyups(&["--help"]);
    assert_eq!(code(&o), 0);
    for c in [
        "inspect",
        "dump",
        "apply",
        "delete",
        "repair",
        "exit status:",
    ] {
        assert!(stdout(&o).contains(c), "{c}: {}", stdout(&o));
    }
    for c in ["inspect", "dump", "apply", "delete", "repair"] {
        let o = dyups(&[c, "--help"]);
        assert_eq!(code(&o), 0, "{c}");
        assert!(
            stdout(&o).starts_with(&format!("usage: dyups {c} --state PATH")),
            "{c}: {}",
            stdout(&o)
        );
    }
    for (args, said) in [
        (&["frobnicate"][..], "unknown command \"frobnicate\""),
        (&["inspect"], "--state PATH is required"),
        (&["inspect", "--state"], "--state needs a value"),
        (&["dump", "--state", "x", "--yaml"], "unknown option --yaml"),
        (&["apply", "--state", "x"], "missing FILE"),
        (
            &["apply", "--state", "x", "--size", "lots", "-"],
            "--size \"lots\" is not a size",
        ),
        (
            &["apply", "--state", "x", "--size", "1k", "-"],
            "out of range",
        ),
        (
            &["apply", "--state", "x", "--if-version", "new", "-"],
            "is not a table version",
        ),
        (
            &["repair", "--state", "x", "--size", "lots"],
            "--size \"lots\" is not a size",
        ),
        (&["repair", "--state", "x", "--size", "1k"], "out of range"),
        (&["delete", "--state", "x"], "missing NAME"),
    ] {
        let o = dyups(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(said), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn apply_creates_the_file_as_init_does_and_dump_reads_back_the_same_table() {
    let d = Dir::new("create");
    let state = d.join("state");
    let input = d.write("in.conf", TWO);
    let o = dyups(&["apply", "--state", s(&state), "--size", "64k", s(&input)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("state file {}: version 1 (created a, b)\n", state.display())
    );
    let m = std::fs::metadata(&state).unwrap();
    assert_eq!(m.mode() & 0o777, 0o644);
    assert!(m.len() <= 64 << 10 && m.len() > 60 << 10, "{}", m.len());
    let o = dyups(&["dump", "--state", s(&state)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let dumped = stdout(&o);
    assert!(dumped.ends_with(TWO), "{dumped}");
    // Read back as an upstream file, it is the same table.
    let back = ngx_dyups::table::syntax::parse_upstream_file(&dumped).unwrap();
    assert_eq!(
        back,
        ngx_dyups::table::syntax::parse_upstream_file(TWO).unwrap()
    );
    let o = dyups(&["dump", "--state", s(&state), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["upstreams"][1]["name"], "b");
    assert_eq!(v["upstreams"][1]["policy"], "least_conn;");
    assert_eq!(v["upstreams"][1]["servers"][0]["weight"], 3);
    // Applying it again changes nothing; --replace from stdin deletes a.
    let o = dyups(&["apply", "--state", s(&state), s(&input)]);
    assert_eq!(
        stdout(&o),
        format!("state file {}: unchanged at version 1\n", state.display())
    );
    let o = dyups_with_input(
        &[
            "apply",
            "--state",
            s(&state),
            "--replace",
            "--if-version",
            "1",
            "-",
        ],
        Some("upstream b { server 127.0.0.1:83; }"),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "state file {}: version 2 (replaced b; deleted a)\n",
            state.display()
        )
    );
}

#[test]
fn refused_writes_exit_with_their_code_and_change_nothing() {
    let d = Dir::new("refused");
    let state = d.join("state");
    let input = d.write("in.conf", TWO);
    assert_eq!(
        code(&dyups(&[
            "apply",
            "--state",
            s(&state),
            "--size",
            "64k",
            s(&input)
        ])),
        0
    );
    let before = d.tables();
    // Bad input: 3, the file and line named.
    let bad = d.write(
        "bad.conf",
        "upstream c {\n    server 127.0.0.1:84;\n    server 127.0.0.1:85 wieght=2;\n}\n",
    );
    let before_bad = d.tables();
    let o = dyups(&["apply", "--state", s(&state), s(&bad)]);
    assert_eq!(code(&o), 3);
    assert!(
        stderr(&o).contains(&format!("upstream file {}: line 3:", bad.display())),
        "{}",
        stderr(&o)
    );
    let o = dyups_with_input(
        &["apply", "--state", s(&state), "-"],
        Some("upstream c {\n server 1.2.3.4:5;"),
    );
    assert_eq!(code(&o), 3);
    assert!(
        stderr(&o).contains("standard input: line 1:"),
        "{}",
        stderr(&o)
    );
    assert_eq!(d.tables(), before_bad);
    std::fs::remove_file(&bad).unwrap();
    // A stale version: 5.
    let o = dyups(&[
        "apply",
        "--state",
        s(&state),
        "--if-version",
        "7",
        s(&input),
    ]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("table version is 1, not the expected 7"),
        "{}",
        stderr(&o)
    );
    let o = dyups(&["delete", "--state", s(&state), "--if-version", "0", "a"]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    // No such upstream: 4.
    let o = dyups(&["delete", "--state", s(&state), "zz"]);
    assert_eq!(code(&o), 4);
    assert!(
        stderr(&o).contains("upstream zz not found"),
        "{}",
        stderr(&o)
    );
    // Too large for the file: 7.
    let many: String = (1..=1000)
        .map(|i| format!("server 10.0.{}.{}:80;", i / 200, i % 200 + 1))
        .collect();
    let big = d.write("big.conf", &format!("upstream big {{ {many} }}"));
    let o = dyups(&["apply", "--state", s(&state), s(&big)]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing was changed"), "{}", stderr(&o));
    std::fs::remove_file(&big).unwrap();
    // Another writer holding the lock: 6.
    let holder = std::fs::File::open(&state).unwrap();
    holder.lock().unwrap();
    let o = dyups(&["delete", "--state", s(&state), "a"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    holder.unlock().unwrap();
    assert_eq!(d.tables(), before);
    // Nothing is created by a refused apply either.
    let fresh = d.join("fresh");
    let o = dyups(&[
        "apply",
        "--state",
        s(&fresh),
        "--if-version",
        "1",
        s(&input),
    ]);
    assert_eq!(code(&o), 5);
    let o = dyups(&["apply", "--state", s(&fresh), "--size", "16k", s(&input)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    std::fs::remove_file(&fresh).unwrap();
    let many = d.write("big.conf", &format!("upstream big {{ {many} }}"));
    let o = dyups(&["apply", "--state", s(&fresh), "--size", "16k", s(&many)]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(!fresh.exists());
    let o = dyups(&["delete", "--state", s(&fresh), "a"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("there is no state file"),
        "{}",
        stderr(&o)
    );
    assert!(!fresh.exists());
}

#[test]
fn inspect_exits_0_only_for_a_sound_file_and_repair_makes_it_sound() {
    let d = Dir::new("damaged");
    let state = d.join("state");
    let input = d.write("in.conf", TWO);
    assert_eq!(
        code(&dyups(&[
            "apply",
            "--state",
            s(&state),
            "--size",
            "64k",
            s(&input)
        ])),
        0
    );
    let o = dyups_with_input(
        &["apply", "--state", s(&state), "-"],
        Some("upstream c { server 127.0.0.1:86; }"),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = dyups(&["inspect", "--state", s(&state)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    for line in [
        &format!("state file {}: sound", state.display())[..],
        "commit word: generation 2, slot 1 active",
        "slot 0: generation 1,",
        "slot 1 (active): generation 2,",
        "table: version 2 from slot 1, 3 upstreams, 4 servers",
        "cells: 4 of ",
        "workers: 0 live",
        "sound, newest generation 2",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    assert!(stderr(&o).is_empty());
    // Wreck the active slot's payload.
    let bytes = std::fs::read(&state).unwrap();
    let slot_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap();
    f.write_all_at(&[0xa5; 16], 4096 + slot_len + 40).unwrap();
    let o = dyups(&["inspect", "--state", s(&state)]);
    assert_eq!(code(&o), 1);
    let why = format!(
        "state file {}: slot 1 is unreadable (checksum mismatch); using the previous table, version 1",
        state.display()
    );
    assert_eq!(stderr(&o), format!("dyups inspect: {why}\n"));
    assert!(stdout(&o).contains("DAMAGED"), "{}", stdout(&o));
    let o = dyups(&["inspect", "--state", s(&state), "--json"]);
    assert_eq!(code(&o), 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["sound"], false);
    assert_eq!(v["damage"], why.as_str());
    assert_eq!(v["slots"][1]["checksum_ok"], false);
    assert_eq!(v["copy"]["newest"], 2);
    let o = dyups(&["dump", "--state", s(&state)]);
    assert_eq!(code(&o), 1);
    assert!(!stdout(&o).contains("upstream c"), "{}", stdout(&o));
    let o = dyups(&["repair", "--state", s(&state)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("from the copy"), "{}", stdout(&o));
    let o = dyups(&["inspect", "--state", s(&state)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("table: version 3 from slot 0, 3 upstreams"),
        "{}",
        stdout(&o)
    );
    let aside: Vec<_> = d
        .contents()
        .into_iter()
        .filter(|(n, _)| n.starts_with("state.damaged."))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        aside[0].1,
        bytes
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let at = 4096 + slot_len as usize + 40;
                if (at..at + 16).contains(&i) {
                    0xa5
                } else {
                    *b
                }
            })
            .collect::<Vec<u8>>()
    );
    let o = dyups(&["repair", "--state", s(&state)]);
    assert_eq!(code(&o), 0);
    assert!(
        stdout(&o).contains("is sound (version 3): nothing was changed"),
        "{}",
        stdout(&o)
    );
    // A missing file is no sound file.
    let o = dyups(&["inspect", "--state", s(&d.join("none"))]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("there is no state file"),
        "{}",
        stderr(&o)
    );
}
