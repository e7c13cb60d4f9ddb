//! An upstream's balancing method as the table stores it: which method and
//! its arguments, checked against the servers as nginx checks them at
//! configuration time, and written back as its directive. The state each
//! method keeps while it picks is [`crate::balance::policy`]'s.

use std::fmt;

use crate::table::model::ServerSpec;

/// An upstream's balancing method, as its `upstream {}` block spells it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    /// nginx's default: smooth weighted round robin.
    #[default]
    RoundRobin,
    IpHash,
    /// `hash KEY [consistent]`: `key` is the nginx expression (say
    /// `$request_uri`); the caller evaluates it and passes the bytes in
    /// `PickInput::key` (`crate::balance::policy`).
    Hash {
        key: String,
        consistent: bool,
    },
    LeastConn,
    Random {
        two: bool,
    },
}

impl Policy {
    /// The directive's name: `round_robin` (which has none in nginx),
    /// `ip_hash`, `hash`, `least_conn` or `random`.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::IpHash => "ip_hash",
            Policy::Hash { .. } => "hash",
            Policy::LeastConn => "least_conn",
            Policy::Random { .. } => "random",
        }
    }

    /// nginx refuses `backup` servers under `hash`, `ip_hash` and `random`;
    /// NGINX Plus refuses `slow_start` under the same.
    pub fn allows_backup(&self) -> bool {
        matches!(self, Policy::RoundRobin | Policy::LeastConn)
    }

    /// Checks the method against the servers it will balance, with the
    /// errors nginx gives at configuration time.
    pub fn validate(&self, servers: &[ServerSpec]) -> Result<(), String> {
        if let Policy::Hash { key, .. } = self {
            if key.is_empty() {
                return Err("hash: the key is empty".to_string());
            }
            if let Some(c) = stray_character(key) {
                return Err(format!("hash: invalid character {c:?} in the key"));
            }
        }
        if !self.allows_backup() {
            let refused = servers.iter().find_map(|s| {
                let param = if s.backup {
                    "backup"
                } else if s.slow_start != 0 {
                    "slow_start"
                } else {
                    return None;
                };
                Some((param, s))
            });
            if let Some((param, s)) = refused {
                return Err(format!(
                    "balancing method \"{}\" does not support parameter \"{param}\" (server {})",
                    self.name(),
                    s.addr
                ));
            }
        }
        Ok(())
    }
}

/// The first character of a hash key that would not survive being written
/// back as `hash KEY;` and read again, if any. Braces are allowed only as
/// nginx reads them in a key, around a variable's name: `${host}-x`.
fn stray_character(key: &str) -> Option<char> {
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek() == Some(&'{') {
            chars.next();
            let mut name = 0usize;
            loop {
                match chars.next() {
                    Some('}') if name > 0 => break,
                    Some(n) if n.is_ascii_alphanumeric() || n == '_' => name += 1,
                    Some(n) => return Some(n),
                    None => return Some('{'),
                }
            }
        } else if c.is_whitespace() || c.is_control() || "{};\"'\\#".contains(c) {
            return Some(c);
        }
    }
    None
}

impl fmt::Display for Policy {
    /// The directive as nginx reads it (`ip_hash;`, `hash $request_uri
    /// consistent;`, `least_conn;`, `random two;`); nothing for round robin.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::RoundRobin => Ok(()),
            Policy::IpHash => f.write_str("ip_hash;"),
            Policy::Hash { key, consistent } => {
                let consistent = if *consistent { " consistent" } else { "" };
                write!(f, "hash {key}{consistent};")
            }
            Policy::LeastConn => f.write_str("least_conn;"),
            Policy::Random { two } => f.write_str(if *two { "random two;" } else { "random;" }),
        }
    }
}
