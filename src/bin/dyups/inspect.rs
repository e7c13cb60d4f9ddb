//! `dyups inspect`: what a state file and its copy hold, and whether the
//! file is sound (the store examines; this prints).

use ngx_dyups::store::{examine_file, Examination};

use crate::args::{Parsed, Spec};
use crate::{emit, exit, Failure, Outcome, LOCK_WAIT};

pub const SPEC: Spec = Spec {
    valued: &["state"],
    flags: &["json"],
    positional: &[],
};

pub const HELP: &str = "\
usage: dyups inspect --state PATH [--json]

Checks the state file at PATH as nginx's `init` does, and shows each part:
the header (format version, geometry), the commit word (generation, active
slot), both table slots (generation, checksum), the table readers use, the
peer cells its servers use, the registered workers with the generation each
has applied, and the copy beside it (PATH.copy: present, which generations
of this file it holds). The file is read under its writer lock, so no write
publishes while it is read.

  --state PATH  the state file (init's `path`)
  --json        the same as one JSON object

Exits 0 only for a sound file. A damaged or missing one exits 1, with the
reason on stderr in the words nginx's `init` uses; the report still shows
what is left (run `dyups repair` to rebuild it).
";

pub fn run(args: &Parsed) -> Outcome {
    let path = args.state().map_err(Failure::usage)?;
    let Some(found) = examine_file(&path, LOCK_WAIT)? else {
        return Err(Failure::failed(format!(
            "there is no state file {}",
            path.display()
        )));
    };
    if args.flag("json") {
        let mut text = serde_json::to_string_pretty(&found).expect("plain data serialises");
        text.push('\n');
        emit(&text)?;
    } else {
        emit(&render(&found))?;
    }
    let trouble = sync_trouble(&path);
    if let Some(line) = &trouble.0 {
        if !args.flag("json") {
            emit(&format!("{line}\n"))?;
        }
    }
    match &found.damage {
        None if trouble.1 => Err(Failure {
            code: exit::SYNC_TROUBLE,
            message: trouble.0.unwrap_or_default(),
        }),
        None => Ok(()),
        Some(why) => Err(Failure {
            code: exit::FAILED,
            message: why.clone(),
        }),
    }
}

/// What `dyups sync` reports in `PATH.sync` as one line, and whether it is
/// trouble: a live agent that cannot follow etcd.
fn sync_trouble(path: &std::path::Path) -> (Option<String>, bool) {
    let at = crate::sync::status_path(path);
    let Ok(text) = std::fs::read_to_string(&at) else {
        return (None, false);
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return (Some(format!("sync: {} is not JSON", at.display())), false);
    };
    let pid = v["pid"].as_u64().unwrap_or(0) as u32;
    let state = v["state"].as_str().unwrap_or("unknown");
    let revision = v["revision"].as_u64().unwrap_or(0);
    if pid == 0 || !ngx_dyups::store::pid_alive(pid) {
        return (
            Some(format!(
                "sync: dyups sync (pid {pid}) is not running; it was {state} at etcd revision {revision}"
            )),
            false,
        );
    }
    let error = v["error"].as_str().unwrap_or("");
    let trouble = state != "following";
    let line = if trouble {
        format!("sync: dyups sync (pid {pid}) is {state} at etcd revision {revision}: {error}")
    } else {
        format!("sync: dyups sync (pid {pid}) is following etcd, at revision {revision}")
    };
    (Some(line), trouble)
}

/// The report as text, one part per line.
fn render(f: &Examination) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "state file {}: {}",
        f.path.display(),
        if f.sound { "sound" } else { "DAMAGED" }
    ));
    if let Some(why) = &f.damage {
        out.push(format!("  damage: {why}"));
    }
    let h = &f.header;
    out.push(match (&h.error, h.file_len) {
        (None, Some(len)) => format!(
            "header: format version {}, {len} bytes, slots of {} bytes, {} worker entries, {} peer cells",
            h.format_version.unwrap_or(h.supported_version),
            h.slot_len.unwrap_or(0),
            h.worker_entries.unwrap_or(0),
            h.peer_cells.unwrap_or(0)
        ),
        (why, _) => format!(
            "header: {}{} ({} bytes on disk)",
            if h.magic { "" } else { "no ngx.dyups magic; " },
            why.as_deref().unwrap_or("unreadable"),
            f.len
        ),
    });
    if let Some(c) = f.commit {
        out.push(format!(
            "commit word: generation {}, slot {} active{}",
            c.generation,
            c.active_slot,
            if c.plausible {
                ""
            } else {
                " (beyond any generation a writer makes: damaged)"
            }
        ));
    }
    for s in &f.slots {
        let state = match (&s.error, s.version) {
            (None, Some(v)) => format!("checksum ok, table version {v}"),
            (Some(why), _) => why.clone(),
            (None, None) => "unreadable".into(),
        };
        out.push(format!(
            "slot {}{}: generation {}, {} bytes, {state}",
            s.index,
            if s.active { " (active)" } else { "" },
            s.generation,
            s.payload_len
        ));
    }
    match &f.table {
        Some(t) => out.push(format!(
            "table: version {} from slot {}, {} upstreams, {} servers{}",
            t.version,
            t.slot,
            t.upstreams,
            t.servers,
            t.fallback
                .as_ref()
                .map_or(String::new(), |why| format!(" ({why})"))
        )),
        None => out.push("table: none readable".into()),
    }
    if let Some(c) = f.cells {
        out.push(format!(
            "cells: {} of {} used{}",
            c.used,
            c.total,
            match c.servers_without {
                0 => String::new(),
                n => format!(", {n} servers without one (the zone is full)"),
            }
        ));
    }
    let live = f.workers.iter().filter(|w| w.alive).count();
    out.push(format!("workers: {live} live"));
    for w in &f.workers {
        out.push(format!(
            "  pid {}: applied generation {}{}",
            w.pid,
            w.applied,
            if w.alive { "" } else { " (exited: ignored)" }
        ));
    }
    let c = &f.copy;
    out.push(if !c.present {
        format!(
            "copy {}: missing (written by the next write)",
            c.path.display()
        )
    } else if let Some(why) = &c.error {
        format!("copy {}: {why}", c.path.display())
    } else {
        let slots: Vec<String> = c
            .slots
            .iter()
            .map(|s| match (s.generation, &s.error) {
                (Some(g), _) => format!("slot {}: generation {g}", s.index),
                (None, why) => format!("slot {}: {}", s.index, why.as_deref().unwrap_or("none")),
            })
            .collect();
        format!(
            "copy {}: {} ({})",
            c.path.display(),
            c.newest
                .map_or("holds no table of this file".into(), |g| format!(
                    "sound, newest generation {g}"
                )),
            slots.join("; ")
        )
    });
    let mut text = out.join("\n");
    text.push('\n');
    text
}
