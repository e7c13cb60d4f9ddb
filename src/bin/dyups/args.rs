//! The command line of one subcommand: `--name VALUE` or `--name=VALUE`
//! options, `--name` flags, then positional arguments (`--` ends the
//! options; `-` is a positional argument: standard input). std only: five
//! subcommands with a handful of options each do not need a parser crate.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

/// What a subcommand takes.
pub struct Spec {
    /// Options with a value.
    pub valued: &'static [&'static str],
    /// Options without one.
    pub flags: &'static [&'static str],
    /// The names of the positional arguments it requires, in order.
    pub positional: &'static [&'static str],
}

/// A parsed command line.
#[derive(Debug, Default)]
pub struct Parsed {
    values: Vec<(&'static str, OsString)>,
    flags: Vec<&'static str>,
    pub positional: Vec<OsString>,
    /// `-h` or `--help` was given: nothing else is checked.
    pub help: bool,
}

impl Parsed {
    pub fn value(&self, name: &str) -> Option<&OsStr> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_os_str())
    }

    /// An option's value as text: numbers and sizes are.
    pub fn text(&self, name: &str) -> Result<Option<&str>, String> {
        self.value(name)
            .map(|v| {
                v.to_str()
                    .ok_or_else(|| format!("--{name}: {v:?} is not valid UTF-8"))
            })
            .transpose()
    }

    pub fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }

    /// `--state PATH`, which every subcommand requires.
    pub fn state(&self) -> Result<PathBuf, String> {
        match self.value("state") {
            Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
            _ => Err("--state PATH is required: the state file nginx's `init` names".into()),
        }
    }
}

/// Parses `args` (after the subcommand's name) by `spec`.
pub fn parse(spec: &Spec, args: impl IntoIterator<Item = OsString>) -> Result<Parsed, String> {
    let mut out = Parsed::default();
    let args: Vec<OsString> = args.into_iter().collect();
    if args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
    {
        out.help = true;
        return Ok(out);
    }
    let mut args = args.into_iter();
    let mut options_end = false;
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if options_end || !text.starts_with('-') || text == "-" {
            out.positional.push(arg);
            continue;
        }
        if text == "--" {
            options_end = true;
            continue;
        }
        let Some(body) = text.strip_prefix("--") else {
            return Err(format!("unknown option {text}"));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        if let Some(&name) = spec.flags.iter().find(|f| **f == name) {
            if inline {
                return Err(format!("--{name} takes no value"));
            }
            if out.flags.contains(&name) {
                return Err(format!("--{name} is given twice"));
            }
            out.flags.push(name);
            continue;
        }
        let Some(&name) = spec.valued.iter().find(|o| **o == name) else {
            return Err(format!("unknown option --{name}"));
        };
        if out.value(name).is_some() {
            return Err(format!("--{name} is given twice"));
        }
        let value = if inline {
            // The value after '=', as given (it may not be UTF-8).
            use std::os::unix::ffi::OsStrExt;
            let bytes = arg.as_bytes();
            OsStr::from_bytes(&bytes[name.len() + 3..]).to_owned()
        } else {
            args.next()
                .ok_or_else(|| format!("--{name} needs a value"))?
        };
        out.values.push((name, value));
    }
    let want = spec.positional;
    if out.positional.len() != want.len() {
        return Err(match (want.len(), out.positional.len()) {
            (0, _) => format!(
                "unexpected argument {:?}",
                out.positional[0].to_string_lossy()
            ),
            (n, got) if got < n => format!("missing {}", want[got..].join(" ")),
            _ => format!(
                "unexpected argument {:?} after {}",
                out.positional[want.len()].to_string_lossy(),
                want.join(" ")
            ),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec {
        valued: &["state", "size"],
        flags: &["json"],
        positional: &["FILE"],
    };

    fn run(args: &[&str]) -> Result<Parsed, String> {
        parse(&SPEC, args.iter().map(OsString::from))
    }

    #[test]
    fn options_in_both_spellings_flags_and_positionals() {
        let p = run(&["--state", "/s", "--size=4m", "--json", "-"]).unwrap();
        assert_eq!(p.state().unwrap(), PathBuf::from("/s"));
        assert_eq!(p.text("size").unwrap(), Some("4m"));
        assert!(p.flag("json"));
        assert_eq!(p.positional, vec![OsString::from("-")]);
        let p = run(&["--state", "/s", "--", "--json"]).unwrap();
        assert!(!p.flag("json"));
        assert_eq!(p.positional, vec![OsString::from("--json")]);
    }

    #[test]
    fn mistakes_are_named() {
        for (args, said) in [
            (&["--state"][..], "--state needs a value"),
            (&["--stat", "/s", "f"], "unknown option --stat"),
            (&["-x", "f"], "unknown option -x"),
            (&["--json=1", "f"], "--json takes no value"),
            (&["--json", "--json", "f"], "--json is given twice"),
            (&["--size", "1", "--size=2", "f"], "--size is given twice"),
            (&["--state", "/s"], "missing FILE"),
            (&["a", "b"], "unexpected argument \"b\" after FILE"),
        ] {
            assert_eq!(run(args).unwrap_err(), said, "{args:?}");
        }
        assert!(run(&["f"])
            .unwrap()
            .state()
            .unwrap_err()
            .contains("--state"));
    }

    #[test]
    fn help_wins_over_everything_else() {
        assert!(run(&["--bogus", "-h"]).unwrap().help);
        assert!(run(&["--help", "--bogus"]).unwrap().help);
        assert!(!run(&["--", "-h"]).unwrap().help);
    }
}
