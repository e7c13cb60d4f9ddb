//! The upstreams `init` seeds from (the upstream file, or the balancer
//! blocks of nginx.conf) at each start and reload of nginx. A new state file
//! is made from them. An existing one keeps its table (changes made at run
//! time survive), and takes, as one write, what changed in the seed since
//! it was last read: an upstream whose block was edited or added is set to
//! the block, one whose block was removed is deleted, the others are left as
//! the table has them. So editing the file and running `nginx -s reload`
//! does what an nginx user expects, without undoing the run-time changes to
//! the upstreams nobody edited.
//!
//! "Last read" is one of two things:
//! * for the file ngx.dyups writes back (`write_upstreams = true`), the table
//!   it was written from: its stamp says which version, and a checksum says
//!   whether it was edited since;
//! * otherwise, the seed as the last start or reload read it, kept beside
//!   the state file in `PATH.seed` (an upstream file, mode 0644).

use std::path::{Path, PathBuf};

use crate::admin::upstream_file::{replace_file, Stamp};
use crate::store::{StateFile, WriteOptions};
use crate::table::model::{Table, Upstream};
use crate::table::syntax::{parse_upstream_file, render_server, render_upstream_file};
use crate::{Error, Result};

/// Where the seed as last read is kept: beside the state file.
pub fn record_path(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".seed");
    state.with_file_name(name)
}

/// The first line of the record, naming the seed it holds.
const RECORD_HEAD: &str = "# ngx.dyups: the upstreams of ";
const RECORD_TAIL: &str = " as nginx's last start or reload read them";

/// The seed as last read from `source`, if the record holds that source's.
/// A record of another source (init was pointed at another file) is no
/// record: what changed cannot be told.
pub fn read_record(state: &Path, source: &str) -> Option<Table> {
    let text = std::fs::read_to_string(record_path(state)).ok()?;
    let (first, rest) = text.split_once('\n')?;
    let named = first.strip_prefix(RECORD_HEAD)?.strip_suffix(RECORD_TAIL)?;
    if named != source {
        return None;
    }
    parse_upstream_file(rest).ok()
}

/// Records `table` as the seed last read from `source`, atomically, mode
/// 0644 whatever the umask.
pub fn write_record(state: &Path, source: &str, table: &Table) -> Result<()> {
    let path = record_path(state);
    let text = format!(
        "{RECORD_HEAD}{source}{RECORD_TAIL}\n{}",
        render_upstream_file(table)
    );
    replace_file(&path, text.as_bytes(), true)
        .map_err(|e| Error::Internal(format!("could not write {}: {e}", path.display())))
}

/// What a start or reload applies: the upstreams to set and the names to
/// delete, only where the table differs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub set: Vec<Upstream>,
    pub delete: Vec<String>,
}

impl Plan {
    /// The changes from `before` to `now` (two readings of the seed) that
    /// `table` does not already have.
    pub fn between(before: &Table, now: &Table, table: &Table) -> Plan {
        let set = now
            .upstreams
            .iter()
            .filter(|u| before.get(&u.name).is_none_or(|b| !b.same_definition(u)))
            .filter(|u| table.get(&u.name).is_none_or(|t| !t.same_definition(u)))
            .map(|u| (**u).clone())
            .collect();
        let delete = before
            .names()
            .filter(|n| now.get(n).is_none() && table.get(n).is_some())
            .map(str::to_owned)
            .collect();
        Plan { set, delete }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.delete.is_empty()
    }

    pub fn apply(&self, table: &mut Table) {
        for u in &self.set {
            table.upsert(u.clone());
        }
        for name in &self.delete {
            table.remove(name);
        }
    }

    /// `upstream local set to { server ...; server ...; }` for each change,
    /// `created { ... }` for a new one, `deleted` for a removed one.
    pub fn describe(&self, table: &Table) -> String {
        let mut said: Vec<String> = self
            .set
            .iter()
            .map(|u| {
                let servers: Vec<String> = u.servers.iter().map(render_server).collect();
                let how = if table.get(&u.name).is_some() {
                    "set to"
                } else {
                    "created"
                };
                format!("upstream {} {how} {{ {} }}", u.name, servers.join(" "))
            })
            .collect();
        said.extend(self.delete.iter().map(|n| format!("upstream {n} deleted")));
        said.join(", ")
    }
}

/// The seed as read now, and the stamp of its file when that file is the
/// one ngx.dyups writes back.
pub struct Reading {
    pub table: Table,
    pub stamp: Option<Stamp>,
}

/// What [`at_start`] did, to log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed in the seed since it was last read (or the table
    /// already holds what changed).
    Unchanged,
    /// Applied as one write: the new table version and what changed.
    Applied { version: u64, what: String },
    /// There was no record of the seed's last reading: it is recorded now,
    /// and the table kept.
    Recorded { version: u64 },
    /// The file written back is behind the table (a write-back failed) and
    /// was not edited: nothing to apply.
    Behind { written: u64, version: u64 },
}

/// How often a start retries when a worker writes between its reading of
/// the table and its write (a reload runs while the old workers serve).
const RACES: usize = 5;

/// At a start or reload, with a state file at `state`: applies what
/// changed in the seed `source` (its name, for messages and the record)
/// since it was last read. `read` reads the seed now, as written; `resolve`
/// resolves the host names of the upstreams that changed in it (before the
/// write, which only takes them). An edited file written back from an older
/// table than the state file's is refused: applying it would undo the
/// changes since.
pub fn at_start(
    state: &Path,
    source: &str,
    read: &dyn Fn() -> Result<Reading>,
    resolve: &dyn Fn(&mut Table) -> Result<()>,
    opts: &WriteOptions,
) -> Result<Outcome> {
    for _ in 0..RACES {
        let mut now = read()?;
        let snap = StateFile::inspect(state)?
            .ok_or_else(|| Error::Internal(format!("state file {} is gone", state.display())))?;
        // What the seed said when it was last read.
        let before = match now.stamp {
            Some(s) if s.version == snap.version => snap.table.clone(),
            Some(s) if s.intact => {
                return Ok(Outcome::Behind {
                    written: s.version,
                    version: snap.version,
                })
            }
            Some(s) => {
                return Err(Error::BadRequest(format!(
                    "{source} was edited, but it holds table version {} and the table is at \
                     version {} (a write-back failed since): applying it would undo the changes \
                     made since version {}; nothing was changed. Make the edit again on the \
                     current table (dyups.write_upstreams, or GET /detail), or remove the file's \
                     first line to have it applied as it is",
                    s.version, snap.version, s.version
                )))
            }
            None => match read_record(state, source) {
                Some(t) => t,
                None => {
                    write_record(state, source, &now.table)?;
                    return Ok(Outcome::Recorded {
                        version: snap.version,
                    });
                }
            },
        };
        if same_tables(&before, &now.table) {
            return Ok(Outcome::Unchanged);
        }
        // Only what changed is asked of the DNS: an unchanged upstream is
        // not set, so its names need no answer (nor a working resolver).
        let mut changed = Table::default();
        for u in &now.table.upstreams {
            if before.get(&u.name).is_none_or(|b| !b.same_definition(u)) && u.has_pending() {
                changed.upstreams.push(u.clone());
            }
        }
        if !changed.upstreams.is_empty() {
            resolve(&mut changed)?;
            for u in changed.upstreams {
                now.table.upsert(std::sync::Arc::unwrap_or_clone(u));
            }
        }
        let expect = now.stamp.map(|s| s.version);
        let written = StateFile::write_detached(state, &WriteOptions { expect, ..*opts }, |t| {
            let plan = Plan::between(&before, &now.table, t);
            let what = plan.describe(t);
            plan.apply(t);
            Ok((plan.is_empty(), what))
        });
        match written {
            Err(Error::VersionMismatch { .. }) => continue,
            Err(e) => return Err(e),
            Ok((version, (empty, what))) => {
                write_record(state, source, &now.table)?;
                return Ok(if empty {
                    Outcome::Unchanged
                } else {
                    Outcome::Applied { version, what }
                });
            }
        }
    }
    Err(Error::Busy(format!(
        "{source}: the table kept changing while its edits were applied: reload again"
    )))
}

fn same_tables(a: &Table, b: &Table) -> bool {
    a.upstreams.len() == b.upstreams.len()
        && a.upstreams
            .iter()
            .all(|u| b.get(&u.name).is_some_and(|v| v.same_definition(u)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ops;
    use crate::testing::TempDir;

    fn table(blocks: &str) -> Table {
        parse_upstream_file(blocks).unwrap()
    }

    fn servers(t: &Table, name: &str) -> Vec<String> {
        t.get(name)
            .map(|u| u.servers.iter().map(render_server).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_plan_takes_only_what_the_seed_changed() {
        let before = table(
            "upstream a { server 127.0.0.1:1; } upstream b { server 127.0.0.1:2; } \
             upstream c { server 127.0.0.1:3; }",
        );
        let now = table(
            "upstream a { server 127.0.0.1:1; } upstream b { server 127.0.0.1:20; } \
             upstream d { server 127.0.0.1:4; }",
        );
        // At run time: a lost its server to a new one; x was created.
        let mut t = before.clone();
        ops::update(&mut t, "a", "server 127.0.0.1:10;").unwrap();
        ops::update(&mut t, "x", "server 127.0.0.1:9;").unwrap();
        let plan = Plan::between(&before, &now, &t);
        let set: Vec<&str> = plan.set.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(set, ["b", "d"]);
        assert_eq!(plan.delete, ["c"]);
        assert_eq!(
            plan.describe(&t),
            "upstream b set to { server 127.0.0.1:20; }, upstream d created \
             { server 127.0.0.1:4; }, upstream c deleted"
        );
        plan.apply(&mut t);
        assert_eq!(
            servers(&t, "a"),
            ["server 127.0.0.1:10;"],
            "a run-time change"
        );
        assert_eq!(servers(&t, "b"), ["server 127.0.0.1:20;"]);
        assert_eq!(servers(&t, "d"), ["server 127.0.0.1:4;"]);
        assert!(t.get("c").is_none());
        assert!(t.get("x").is_some(), "created at run time");
        // What the table already has is no change.
        assert!(Plan::between(&before, &now, &t).is_empty());
    }

    fn state_with(dir: &TempDir, seed: &str) -> PathBuf {
        let state = dir.path().join("dyups.state");
        let t = table(seed);
        StateFile::open_detached(&state, 1 << 20, || Ok(t)).unwrap();
        state
    }

    fn reading(text: &str) -> Result<Reading> {
        Ok(Reading {
            table: table(text),
            stamp: crate::admin::upstream_file::stamp_of(text),
        })
    }

    fn current(state: &Path) -> (u64, Table) {
        let s = StateFile::inspect(state).unwrap().unwrap();
        (s.version, s.table)
    }

    #[test]
    fn a_start_records_then_applies_what_changed_in_the_seed() {
        let dir = TempDir::new();
        let v1 = "upstream a { server 127.0.0.1:1; }\nupstream b { server 127.0.0.1:2; }\n";
        let state = state_with(&dir, v1);
        let opts = WriteOptions::default();
        let src = "upstream file /x/upstream.conf";
        // No record yet (a state file from before): recorded, table kept.
        let out = at_start(&state, src, &|| reading(v1), &|_| Ok(()), &opts).unwrap();
        assert_eq!(out, Outcome::Recorded { version: 1 });
        assert!(record_path(&state).exists());
        // A run-time change, then a start with the seed unchanged: kept.
        StateFile::write_detached(&state, &opts, |t| {
            ops::update(t, "b", "server 127.0.0.1:22;")
        })
        .unwrap();
        assert_eq!(
            at_start(&state, src, &|| reading(v1), &|_| Ok(()), &opts).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(current(&state).0, 2);
        // The seed edited: a changed, c added; b (changed at run time, not
        // in the file) kept.
        let v2 = "upstream a { server 127.0.0.1:11; }\nupstream b { server 127.0.0.1:2; }\n\
                  upstream c { server 127.0.0.1:3; }\n";
        let out = at_start(&state, src, &|| reading(v2), &|_| Ok(()), &opts).unwrap();
        assert_eq!(
            out,
            Outcome::Applied {
                version: 3,
                what: "upstream a set to { server 127.0.0.1:11; }, upstream c created \
                       { server 127.0.0.1:3; }"
                    .into()
            }
        );
        let (v, t) = current(&state);
        assert_eq!(v, 3, "one write");
        assert_eq!(servers(&t, "a"), ["server 127.0.0.1:11;"]);
        assert_eq!(servers(&t, "b"), ["server 127.0.0.1:22;"]);
        assert_eq!(servers(&t, "c"), ["server 127.0.0.1:3;"]);
        // Read again as it is: nothing more.
        assert_eq!(
            at_start(&state, src, &|| reading(v2), &|_| Ok(()), &opts).unwrap(),
            Outcome::Unchanged
        );
        // A block removed: that upstream deleted.
        let v3 = "upstream a { server 127.0.0.1:11; }\nupstream b { server 127.0.0.1:2; }\n";
        let out = at_start(&state, src, &|| reading(v3), &|_| Ok(()), &opts).unwrap();
        assert!(
            matches!(out, Outcome::Applied { version: 4, .. }),
            "{out:?}"
        );
        assert!(current(&state).1.get("c").is_none());
        // A record of another source is none: recorded anew, nothing applied.
        let out = at_start(
            &state,
            "upstream file /y.conf",
            &|| reading(v1),
            &|_| Ok(()),
            &opts,
        )
        .unwrap();
        assert_eq!(out, Outcome::Recorded { version: 4 });
    }

    #[test]
    fn a_bad_seed_changes_nothing() {
        let dir = TempDir::new();
        let v1 = "upstream a { server 127.0.0.1:1; }\n";
        let state = state_with(&dir, v1);
        let opts = WriteOptions::default();
        at_start(&state, "s", &|| reading(v1), &|_| Ok(()), &opts).unwrap();
        let before = std::fs::read(record_path(&state)).unwrap();
        let bad = || Err(Error::BadRequest("line 1: nope".into()));
        assert!(at_start(&state, "s", &bad, &|_| Ok(()), &opts).is_err());
        assert_eq!(current(&state).0, 1);
        assert_eq!(std::fs::read(record_path(&state)).unwrap(), before);
    }

    #[test]
    fn a_written_back_file_is_compared_with_the_table_it_was_written_from() {
        let dir = TempDir::new();
        let state = state_with(&dir, "upstream a { server 127.0.0.1:1; }\n");
        let file = dir.path().join("upstream.conf");
        let opts = WriteOptions::default();
        let src = "upstream file (written back)";
        let from_file = || reading(&std::fs::read_to_string(&file).unwrap());
        // Run-time changes, each written back: the file is the table.
        for port in [2, 3] {
            let (v, ()) = StateFile::write_detached(&state, &opts, |t| {
                ops::update(t, &format!("u{port}"), &format!("server 127.0.0.1:{port};"))
            })
            .unwrap();
            crate::admin::upstream_file::write(&file, &current(&state).1, v).unwrap();
        }
        assert_eq!(
            at_start(&state, src, &from_file, &|_| Ok(()), &opts).unwrap(),
            Outcome::Unchanged
        );
        // Edited by hand: what the edit changed is applied, nothing else.
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace("127.0.0.1:3", "127.0.0.1:33")).unwrap();
        let out = at_start(&state, src, &from_file, &|_| Ok(()), &opts).unwrap();
        assert_eq!(
            out,
            Outcome::Applied {
                version: 4,
                what: "upstream u3 set to { server 127.0.0.1:33; }".into()
            }
        );
        // A change the file missed (its write-back failed): the file, as
        // written, is only behind...
        StateFile::write_detached(&state, &opts, |t| {
            ops::update(t, "u2", "server 127.0.0.1:222;")
        })
        .unwrap();
        crate::admin::upstream_file::write(&file, &current(&state).1, 5).unwrap();
        StateFile::write_detached(&state, &opts, |t| {
            ops::update(t, "u2", "server 127.0.0.1:2222;")
        })
        .unwrap();
        assert_eq!(
            at_start(&state, src, &from_file, &|_| Ok(()), &opts).unwrap(),
            Outcome::Behind {
                written: 5,
                version: 6
            }
        );
        // ...and, edited, refused: it would undo version 6.
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace("127.0.0.1:1;", "127.0.0.1:11;")).unwrap();
        let err = at_start(&state, src, &from_file, &|_| Ok(()), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds table version 5 and the table is at version 6"),
            "{err}"
        );
        let (v, t) = current(&state);
        assert_eq!(v, 6);
        assert_eq!(servers(&t, "u2"), ["server 127.0.0.1:2222;"]);
    }
}
