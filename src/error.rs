//! The one error type of the core. Each kind maps to the HTTP status that
//! ngx_http_dyups_module (and our REST interface) answers with, so every
//! interface reports a failure the same way.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The request is malformed or would break a rule (400).
    BadRequest(String),
    /// The named upstream or server does not exist (404).
    NotFound(String),
    /// The writer lock is held and the caller asked not to wait (409).
    Busy(String),
    /// The upstream belongs to etcd (`dyups sync` writes it) and this is a
    /// local write (409): the message names the key to write instead.
    Owned(String),
    /// The caller's expected table version is not the current one (412).
    VersionMismatch { expected: u64, actual: u64 },
    /// Another precondition of the caller does not hold (412): an
    /// `If-None-Match: *` write to something that exists, say.
    PreconditionFailed(String),
    /// The new table does not fit the state file's capacity (507).
    NoSpace(String),
    /// The state file is unusable or an I/O call failed (500).
    Internal(String),
}

impl Error {
    /// The HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::NotFound(_) => 404,
            Error::Busy(_) | Error::Owned(_) => 409,
            Error::VersionMismatch { .. } | Error::PreconditionFailed(_) => 412,
            Error::NoSpace(_) => 507,
            Error::Internal(_) => 500,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadRequest(m)
            | Error::NotFound(m)
            | Error::Busy(m)
            | Error::Owned(m)
            | Error::PreconditionFailed(m)
            | Error::NoSpace(m)
            | Error::Internal(m) => f.write_str(m),
            Error::VersionMismatch { expected, actual } => write!(
                f,
                "table version is {actual}, not the expected {expected}: read it again and retry"
            ),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
