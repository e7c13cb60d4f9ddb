//! `dyups`: the state file of ngx.dyups from the command line, through the
//! same store code as nginx's workers (no Lua, no nginx needed). Each
//! subcommand is a module with a `SPEC` of its arguments, a `HELP` text and
//! a `run`; this file dispatches and turns failures into exit codes.

mod apply;
mod args;
mod dump;
mod etcd;
mod inspect;
mod owner;
mod repair;
mod sync;

use std::ffi::OsString;
use std::process::ExitCode;

use ngx_dyups::store::{parse_size, Geometry, Wait};
use ngx_dyups::Error;

/// How long a command waits for the state file's writer lock: the workers'
/// default (`lock_timeout`), since a command waits its turn in the same
/// queue as their writes and a fair queue refuses only what it could not
/// serve in that time.
pub const LOCK_WAIT: Wait = Wait::For(ngx_dyups::store::DEFAULT_WAIT);

/// Exit codes (README, "Command-line tool"). The write failures keep the
/// HTTP statuses' distinctions, so a script tells them apart as a client
/// of the REST interface does.
pub mod exit {
    pub const OK: u8 = 0;
    /// The state file is damaged, missing or unreadable, or an I/O call
    /// failed (500).
    pub const FAILED: u8 = 1;
    /// The command line is wrong.
    pub const USAGE: u8 = 2;
    /// The input is not valid (400): the message names the line.
    pub const BAD_INPUT: u8 = 3;
    /// No such upstream (404).
    pub const NOT_FOUND: u8 = 4;
    /// `--if-version` is not the table's version (412).
    pub const STALE: u8 = 5;
    /// Another writer held the lock too long (409).
    pub const BUSY: u8 = 6;
    /// The new table does not fit the state file (507).
    pub const NO_ROOM: u8 = 7;
    /// The upstream belongs to etcd (409 from `dyups sync`'s ownership):
    /// write its key in etcd instead.
    pub const OWNED: u8 = 8;
    /// inspect: the file is sound, but the `dyups sync` serving it reports
    /// that it cannot follow etcd (unreachable, no quorum).
    pub const SYNC_TROUBLE: u8 = 9;
}

/// Why a command failed: what stderr says and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::USAGE,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::FAILED,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        // By HTTP status, as every other interface reports the error.
        let code = match e.status() {
            _ if matches!(e, Error::Owned(_)) => exit::OWNED,
            400 => exit::BAD_INPUT,
            404 => exit::NOT_FOUND,
            409 => exit::BUSY,
            412 => exit::STALE,
            507 => exit::NO_ROOM,
            _ => exit::FAILED,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

/// What a command may return.
pub type Outcome = Result<(), Failure>;

/// Writes a command's output to stdout. A reader that went away (`| head`)
/// is no failure; any other error is (`dump > full-disk/file` must not
/// exit 0).
pub fn emit(text: &str) -> Outcome {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::failed(format!("could not write the output: {e}")))
        }
        _ => Ok(()),
    }
}

/// `--size SIZE`, the size of a state file a command creates (as init's
/// `size`: bytes, or with k, m or g), refused as a usage error when it is
/// no size or no state file can have it; `None` when not given.
pub fn size_option(args: &args::Parsed) -> Result<Option<u64>, Failure> {
    let Some(text) = args.text("size").map_err(Failure::usage)? else {
        return Ok(None);
    };
    let size = parse_size(text).ok_or_else(|| {
        Failure::usage(format!(
            "--size {text:?} is not a size (e.g. 1048576, 512k, 4m)"
        ))
    })?;
    Geometry::for_file_len(size).map_err(|e| Failure::usage(format!("--size: {e}")))?;
    Ok(Some(size))
}

struct Command {
    name: &'static str,
    summary: &'static str,
    help: &'static str,
    spec: &'static args::Spec,
    run: fn(&args::Parsed) -> Outcome,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "inspect",
        summary: "check a state file and its copy, field by field",
        help: inspect::HELP,
        spec: &inspect::SPEC,
        run: inspect::run,
    },
    Command {
        name: "dump",
        summary: "print the table as an upstream file (or JSON)",
        help: dump::HELP,
        spec: &dump::SPEC,
        run: dump::run,
    },
    Command {
        name: "apply",
        summary: "write the upstreams of an upstream file, as one change",
        help: apply::HELP,
        spec: &apply::SPEC,
        run: apply::run,
    },
    Command {
        name: "delete",
        summary: "delete one upstream",
        help: apply::DELETE_HELP,
        spec: &apply::DELETE_SPEC,
        run: apply::run_delete,
    },
    Command {
        name: "repair",
        summary: "rebuild a damaged state file",
        help: repair::HELP,
        spec: &repair::SPEC,
        run: repair::run,
    },
    Command {
        name: "sync",
        summary: "make the state file follow the upstreams in etcd",
        help: sync::HELP,
        spec: &sync::SPEC,
        run: sync::run,
    },
];

const EXIT_CODES: &str = "\
exit status:
  0  done (inspect: the file is sound; repair: it is sound now)
  1  the state file is damaged, missing or unreadable, or I/O failed
  2  usage: the command line is wrong
  3  bad input (HTTP 400): the message names the file and line
  4  no such upstream (404)
  5  --if-version is not the table's version (412): nothing was changed
  6  another writer held the state file's lock too long (409)
  7  the new table does not fit the state file (507): raise its size
  8  the upstream belongs to etcd (dyups sync writes it): write its key there
  9  inspect: the file is sound, but its dyups sync cannot follow etcd
";

fn usage() -> String {
    let mut out = String::from(
        "usage: dyups COMMAND --state PATH [OPTIONS] [ARGS]\n\n\
         The upstream table of ngx.dyups, in the state file nginx's workers map,\n\
         read and written by the same protocol as theirs: safe while nginx runs.\n\ncommands:\n",
    );
    for c in COMMANDS {
        out.push_str(&format!("  {:<8} {}\n", c.name, c.summary));
    }
    out.push_str("\nRun `dyups COMMAND --help` for a command's options.\n\n");
    out.push_str(EXIT_CODES);
    out
}

fn main() -> ExitCode {
    let mut argv = std::env::args_os().skip(1);
    let Some(first) = argv.next() else {
        eprint!("{}", usage());
        return ExitCode::from(exit::USAGE);
    };
    let name = first.to_string_lossy();
    match name.as_ref() {
        "-h" | "--help" | "help" => {
            let topic = argv.next();
            let topic = topic.as_ref().map(|t| t.to_string_lossy());
            let text = match topic.and_then(|t| COMMANDS.iter().find(|c| c.name == t)) {
                Some(c) => c.help.to_owned(),
                None => usage(),
            };
            return ExitCode::from(emit(&text).map_or(exit::FAILED, |()| exit::OK));
        }
        "-V" | "--version" => {
            let text = format!("dyups {}\n", env!("CARGO_PKG_VERSION"));
            return ExitCode::from(emit(&text).map_or(exit::FAILED, |()| exit::OK));
        }
        _ => {}
    }
    let Some(command) = COMMANDS.iter().find(|c| c.name == name) else {
        eprintln!("dyups: unknown command {name:?}\n");
        eprint!("{}", usage());
        return ExitCode::from(exit::USAGE);
    };
    ExitCode::from(run(command, argv.collect()))
}

fn run(command: &Command, argv: Vec<OsString>) -> u8 {
    let parsed = match args::parse(command.spec, argv) {
        Ok(p) if p.help => return emit(command.help).map_or(exit::FAILED, |()| exit::OK),
        Ok(p) => p,
        Err(why) => {
            eprintln!(
                "dyups {}: {why}\nRun `dyups {} --help` for its usage.",
                command.name, command.name
            );
            return exit::USAGE;
        }
    };
    match (command.run)(&parsed) {
        Ok(()) => exit::OK,
        Err(f) => {
            eprintln!("dyups {}: {}", command.name, f.message);
            if f.code == exit::USAGE {
                eprintln!("Run `dyups {} --help` for its usage.", command.name);
            }
            f.code
        }
    }
}
