//! `dyups apply` and `dyups delete`: one write each, through the store's
//! lock protocol, as the module's own writes are.

use std::cell::Cell;
use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;

use ngx_dyups::admin::ops::{self, Put};
use ngx_dyups::store::{StateFile, WriteOptions, DEFAULT_SIZE};
use ngx_dyups::table::model::Table;
use ngx_dyups::table::syntax::parse_upstream_file;
use ngx_dyups::Error;

use crate::args::{Parsed, Spec};
use crate::{emit, exit, owner, size_option, Failure, Outcome, LOCK_WAIT};

pub const SPEC: Spec = Spec {
    valued: &["state", "size", "if-version"],
    flags: &["replace"],
    positional: &["FILE"],
};

pub const HELP: &str = "\
usage: dyups apply --state PATH [--size SIZE] [--if-version N] [--replace] FILE|-

Writes the `upstream NAME { server ...; }` blocks of FILE (or of standard
input, for -) into the state file as one change: each upstream is created
or replaced, all or none of them. An upstream that says the same as the one
of its name is left as it is. nginx's workers route by the new table on
their next refresh. Bad input changes nothing; the message names the line.

  --state PATH      the state file (init's `path`)
  --if-version N    write only if the table is at version N (else exit 5
                    and change nothing): a read-decide-write that cannot
                    lose another writer's change
  --replace         also delete every local upstream FILE does not name:
                    the table becomes FILE's, and etcd's (dyups sync)
  --size SIZE       the size of a state file that does not exist yet, as
                    init's `size` (bytes, or with k, m or g; default 2m)

A missing state file is created as init creates it (its directory must
exist), holding FILE's upstreams at version 1. Run as root, the new file
goes to the owner of its directory (nginx's workers must open it for
writing; init makes the directory theirs), and a copy file this command
makes goes to the state file's owner.

Prints the new version and what changed.
";

pub const DELETE_SPEC: Spec = Spec {
    valued: &["state", "if-version"],
    flags: &[],
    positional: &["NAME"],
};

pub const DELETE_HELP: &str = "\
usage: dyups delete --state PATH [--if-version N] NAME

Deletes the upstream NAME from the state file, as one write. Exits 4 when
there is no such upstream; a missing state file is not created.

  --state PATH    the state file (init's `path`)
  --if-version N  delete only if the table is at version N (else exit 5)
";

pub fn run(args: &Parsed) -> Outcome {
    let path = args.state().map_err(Failure::usage)?;
    let size = size_option(args)?.unwrap_or(DEFAULT_SIZE);
    let expect = if_version(args)?;
    let replace = args.flag("replace");
    // The input first: bad input touches no file, not even a new one.
    let mut given = read_input(&args.positional[0])?;
    // Host names are resolved here, before the write, blocking (as nginx
    // resolves those of its configuration), with /etc/resolv.conf's name
    // servers unless a block has a resolver line; an upstream the table
    // holds as written asks nothing.
    let current = StateFile::inspect(&path).ok().flatten().map(|s| s.table);
    let mut asked = Table::default();
    for u in &given.upstreams {
        let held = current.as_ref().and_then(|t| t.get(&u.name));
        if u.has_pending() && !held.is_some_and(|c| c.same_definition(u)) {
            asked.upstreams.push(u.clone());
        }
    }
    if !asked.upstreams.is_empty() {
        ngx_dyups::dns::resolve_blocking(&mut asked, &ngx_dyups::dns::Defaults::system())?;
        for u in asked.upstreams {
            given.upsert(std::sync::Arc::unwrap_or_clone(u));
        }
    }
    let existed = path.exists();
    if !existed {
        if let Some(n) = expect {
            return Err(Failure {
                code: exit::STALE,
                message: format!(
                    "there is no state file {}, so its table is not at version {n}: nothing was created",
                    path.display()
                ),
            });
        }
    }
    // A new file holds the input from the start, so a table that does not
    // fit creates nothing either.
    let seeded = Cell::new(None);
    let store = StateFile::open(&path, size, || {
        let mut table = Table::default();
        let put = ops::put_upstreams(&mut table, &given, replace)?;
        seeded.set(Some((table.clone(), put)));
        Ok(table)
    })?;
    let created = match seeded.take() {
        Some((table, put)) => {
            let now = store.read()?;
            let ours = now.table.upstreams.len() == table.upstreams.len()
                && now
                    .table
                    .upstreams
                    .iter()
                    .zip(&table.upstreams)
                    .all(|(a, b)| a.same_content(b));
            // Else another process created it first: write into theirs.
            (now.version == 1 && ours).then_some((now.version, put))
        }
        None => None,
    };
    let (version, put) = match created {
        Some(done) => {
            if !existed {
                owner::give_new_file(&path)?;
            }
            done
        }
        None => store.write(&write_options(expect), |t| {
            ops::put_upstreams(t, &given, replace)
        })?,
    };
    owner::give_copy(&path);
    emit(&format!(
        "state file {}: {}\n",
        path.display(),
        summary(version, &put)
    ))
}

pub fn run_delete(args: &Parsed) -> Outcome {
    let path = args.state().map_err(Failure::usage)?;
    let expect = if_version(args)?;
    let name = args.positional[0]
        .to_str()
        .ok_or_else(|| Failure::usage("NAME is not valid UTF-8"))?;
    let store = open_existing(&path)?;
    let (version, ()) = store.write(&write_options(expect), |t| ops::delete(t, name))?;
    owner::give_copy(&path);
    emit(&format!(
        "state file {}: version {version} (deleted {name})\n",
        path.display()
    ))
}

/// The state file at `path`, which must exist: only `apply` creates one.
fn open_existing(path: &Path) -> Result<std::sync::Arc<StateFile>, Failure> {
    let missing = || {
        Error::Internal(format!(
            "there is no state file {}: nothing was changed",
            path.display()
        ))
    };
    if !path.exists() {
        return Err(missing().into());
    }
    Ok(StateFile::open(path, DEFAULT_SIZE, || Err(missing()))?)
}

fn if_version(args: &Parsed) -> Result<Option<u64>, Failure> {
    args.text("if-version")
        .map_err(Failure::usage)?
        .map(|t| {
            t.parse::<u64>().map_err(|_| {
                Failure::usage(format!(
                    "--if-version {t:?} is not a table version (a whole number)"
                ))
            })
        })
        .transpose()
}

fn write_options(expect: Option<u64>) -> WriteOptions {
    WriteOptions {
        wait: LOCK_WAIT,
        expect,
        durable: true,
    }
}

/// The upstreams of FILE, or of standard input for `-`; errors name it.
fn read_input(arg: &OsStr) -> Result<Table, Failure> {
    let (name, bytes) = if arg == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::failed(format!("could not read standard input: {e}")))?;
        ("standard input".to_owned(), bytes)
    } else {
        let path = Path::new(arg);
        let bytes = std::fs::read(path).map_err(|e| {
            Failure::from(Error::BadRequest(format!(
                "could not read upstream file {}: {e}",
                path.display()
            )))
        })?;
        (format!("upstream file {}", path.display()), bytes)
    };
    let text = String::from_utf8(bytes)
        .map_err(|e| Failure::from(Error::BadRequest(format!("{name}: not UTF-8 text ({e})"))))?;
    parse_upstream_file(&text).map_err(|e| match e {
        Error::BadRequest(why) => Failure::from(Error::BadRequest(format!("{name}: {why}"))),
        other => Failure::from(other),
    })
}

fn summary(version: u64, put: &Put) -> String {
    let parts: Vec<String> = [
        ("created", &put.created),
        ("replaced", &put.replaced),
        ("deleted", &put.deleted),
        ("unchanged", &put.unchanged),
    ]
    .into_iter()
    .filter(|(_, names)| !names.is_empty())
    .map(|(what, names)| format!("{what} {}", names.join(", ")))
    .collect();
    if put.created.is_empty() && put.replaced.is_empty() && put.deleted.is_empty() {
        return format!("unchanged at version {version}");
    }
    format!("version {version} ({})", parts.join("; "))
}
