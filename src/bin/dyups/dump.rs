//! `dyups dump`: the table as an upstream file `init` reads, or as JSON.

use ngx_dyups::store::StateFile;
use ngx_dyups::table::syntax::render_upstream;

use crate::args::{Parsed, Spec};
use crate::{emit, Failure, Outcome};

pub const SPEC: Spec = Spec {
    valued: &["state"],
    flags: &["json"],
    positional: &[],
};

pub const HELP: &str = "\
usage: dyups dump --state PATH [--json]

Prints the table nginx's workers route by: `upstream NAME { ... }` blocks
that init{ upstreams = ... } reads back as the same table, or with --json
an object {\"version\": N, \"upstreams\": [...]}, with \"sync\": {\"revision\",
\"cluster_id\", \"prefix\"} when `dyups sync` writes it (the etcd revision the
table holds, which a restart of the agent resumes from). Read without the
writer lock, as the workers read it: a consistent table even while writes
go on.

  --state PATH  the state file (init's `path`)
  --json        JSON instead of nginx syntax

A damaged file whose previous table is still whole prints that table, says
so on stderr and exits 1; a file with no readable table exits 1.
";

pub fn run(args: &Parsed) -> Outcome {
    let path = args.state().map_err(Failure::usage)?;
    let Some(snapshot) = StateFile::inspect(&path)? else {
        return Err(Failure::failed(format!(
            "there is no state file {}",
            path.display()
        )));
    };
    if args.flag("json") {
        let mut out = serde_json::json!({
            "version": snapshot.version,
            "upstreams": snapshot.table.upstreams,
        });
        if let Some(m) = &snapshot.table.sync {
            out["sync"] = serde_json::json!({
                "revision": m.revision,
                // As etcd's JSON writes it: a u64 past 2^53 loses digits in
                // a JSON number read as a double.
                "cluster_id": m.cluster_id.to_string(),
                "prefix": m.prefix,
            });
        }
        let mut text = serde_json::to_string_pretty(&out).expect("plain data serialises");
        text.push('\n');
        emit(&text)?;
    } else {
        let mut out = format!(
            "# dyups dump of state file {}, version {}\n",
            path.display(),
            snapshot.version
        );
        for u in &snapshot.table.upstreams {
            out.push('\n');
            out.push_str(&render_upstream(u));
        }
        emit(&out)?;
    }
    match snapshot.fallback {
        None => Ok(()),
        Some(why) => Err(Failure::failed(format!(
            "state file {}: {why}; printed that table (run `dyups repair`)",
            path.display()
        ))),
    }
}
