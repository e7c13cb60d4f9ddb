//! `dyups repair`: a damaged state file rebuilt and put in its place (the
//! store does the work; see `ngx_dyups::store::repair`).

use std::path::Path;

use ngx_dyups::admin::upstream_file;
use ngx_dyups::store::{repair, Repair, RepairOptions};

use crate::args::{Parsed, Spec};
use crate::{emit, owner, size_option, Failure, Outcome, LOCK_WAIT};

pub const SPEC: Spec = Spec {
    valued: &["state", "from", "size"],
    flags: &[],
    positional: &[],
};

pub const HELP: &str = "\
usage: dyups repair --state PATH [--from FILE] [--size SIZE]

Rebuilds a damaged state file: a new file holding the newest sound table
there is, the last table a slot of the damaged file published or the one
in its copy (PATH.copy, which every write updates before it is
acknowledged), or with --from the upstreams of FILE. Its version is above
any the damaged file reached. The damaged bytes are kept, as they were, in
PATH.damaged.<unix time> (mode 0600).

Safe while nginx runs: the new file is put at the path by rename, under
the damaged file's writer lock, never written over the file the workers
map; each worker moves to it on its next refresh. (The workers also
restore a damaged file themselves within a second or so; a repair that
finds the file sound changes nothing and says so.)

  --state PATH  the state file (init's `path`)
  --from FILE   rebuild from this upstream file instead; with no state
                file at PATH, create one from it
  --size SIZE   the size of the rebuilt file (as init's `size`); default
                the damaged file's, as its header says, else its length

Run as root, the rebuilt file keeps the damaged file's owner.

Exits 0 when the file at PATH is sound afterwards (rebuilt, or sound
already), 1 when there is nothing sound to rebuild from (give --from).
";

pub fn run(args: &Parsed) -> Outcome {
    let path = args.state().map_err(Failure::usage)?;
    let size = size_option(args)?;
    let from = match args.value("from") {
        None => None,
        Some(file) => {
            let file = Path::new(file);
            let table = upstream_file::read(file)?;
            Some((table, format!("upstream file {}", file.display())))
        }
    };
    let opts = RepairOptions {
        from,
        size,
        owner: owner::for_rebuilt(&path),
        wait: LOCK_WAIT,
    };
    let said = match repair(&path, &opts)? {
        Repair::Sound { version } => format!(
            "state file {} is sound (version {version}): nothing was changed\n",
            path.display()
        ),
        Repair::Created { version } => format!(
            "there was no state file {}: created it from {} at version {version}\n",
            path.display(),
            opts.from.as_ref().map_or("", |(_, f)| f.as_str())
        ),
        Repair::Rebuilt {
            damage,
            version,
            from,
            aside,
        } => format!(
            "{damage}\nrebuilt state file {} from {from} at version {version}; the damaged file is kept as {}\n",
            path.display(),
            aside.display()
        ),
    };
    emit(&said)
}
