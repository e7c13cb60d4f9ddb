//! The `/ups` and `/ups/check` interface of lua-nginx-upstream-dynamic-update
//! (the first source document): its query arguments, messages and JSON shape
//! (`{"msg":…,"data":…,"code":…}`), over the same operations as every other
//! interface. `data` is the target server in a list, on failures as on
//! successes, as in the original. One difference, documented in the README:
//! failures answer HTTP 400 (405 for a wrong method) with code `E00001`,
//! where the original answered 200 to everything.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::admin::ops;
use crate::store::{Snapshot, StateFile, WriteOptions};
use crate::table::model::Change;
use crate::table::syntax::parse_address;
use crate::Error;

pub const OK: &str = "A00001";
pub const FAILED: &str = "E00001";
pub const USAGE: &str = "usage: /ups?op=add|del&server=IP:PORT[&upstream=NAME]";
/// Methods `/ups` and `/ups/check` answer (the original used PUT).
pub const ALLOWED: &str = "GET, POST, PUT";

/// One query argument as nginx hands it over: absent, given without a value
/// (`?op`), given once, or given more than once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    Absent,
    Flag,
    One(String),
    Many,
}

/// A response: HTTP status and JSON body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

#[derive(Serialize)]
struct Body<'a, D: Serialize> {
    msg: &'a str,
    data: D,
    code: &'a str,
}

fn reply<D: Serialize>(status: u16, msg: &str, data: D) -> Reply {
    let code = if status == 200 { OK } else { FAILED };
    let body = serde_json::to_string(&Body { msg, data, code }).expect("plain data serialises");
    Reply { status, body }
}

fn refuse(status: u16, msg: &str) -> Reply {
    reply(status, msg, [(); 0])
}

/// A request refused before it reached the table (a precondition header, a
/// query too long to read whole): 400 with `data` naming the target server,
/// as every other failure does.
pub fn refused(msg: &str, server: &Arg) -> Reply {
    reply(400, msg, target(server))
}

/// `data` of a request naming `server`: the server in a list, as nginx
/// spells the address when it is one, else as given; empty without one.
fn target(server: &Arg) -> Vec<String> {
    let Arg::One(server) = server else {
        return Vec::new();
    };
    // The address without any parameters given.
    let shown = server.split_whitespace().next().unwrap_or(server);
    if shown.is_empty() {
        return Vec::new();
    }
    vec![parse_address(shown).map_or_else(|_| shown.to_owned(), |a| a.to_string())]
}

/// Why `method` is refused (405), if it is.
fn not_allowed(method: &str) -> Option<String> {
    (!matches!(method, "GET" | "POST" | "PUT"))
        .then(|| format!("method {method} is not allowed: use {ALLOWED}"))
}

/// The value of query argument `what`; why the request is bad otherwise.
fn text<'a>(arg: &'a Arg, what: &str, required: bool) -> Result<Option<&'a str>, String> {
    match arg {
        Arg::One(v) if !v.is_empty() => Ok(Some(v)),
        Arg::Absent if !required => Ok(None),
        Arg::Many => Err(format!("{what} is given more than once; {USAGE}")),
        _ => Err(format!("missing {what}; {USAGE}")),
    }
}

/// `/ups?op=add|del&server=IP:PORT[&upstream=NAME]`: puts a server back into
/// rotation or takes it out, in the named upstream or in every upstream that
/// has it.
pub fn handle(
    method: &str,
    op: &Arg,
    server: &Arg,
    upstream: &Arg,
    store: &StateFile,
    opts: &WriteOptions,
) -> Reply {
    let data = target(server);
    if let Some(why) = not_allowed(method) {
        return reply(405, &why, &data);
    }
    let parsed = (|| {
        let op = text(op, "op", true)?.unwrap_or_default();
        let add = match op {
            "add" => true,
            "del" => false,
            other => return Err(format!("unknown op {other:?}; {USAGE}")),
        };
        let server = text(server, "server", true)?.unwrap_or_default();
        let upstream = text(upstream, "upstream", false)?;
        Ok((add, server, upstream))
    })();
    let (add, server, upstream) = match parsed {
        Ok(p) => p,
        Err(why) => return reply(400, &why, &data),
    };
    let result = store.write(opts, |t| {
        if add {
            ops::add_server(t, upstream, server)
        } else {
            ops::remove_server(t, upstream, server)
        }
    });
    match result {
        Ok(_) => {
            let msg = if add {
                "add a server success."
            } else {
                "del a server success."
            };
            reply(200, msg, &data)
        }
        Err(e) => reply(status_of(&e), &e.to_string(), &data),
    }
}

/// `/ups/check`: the servers whose change some live worker has not applied
/// yet, 1 for a pending removal and 0 for a pending restore; `{}` once every
/// worker routes by the current table.
pub fn check(method: &str, store: &StateFile, snapshot: &Snapshot) -> Reply {
    if let Some(why) = not_allowed(method) {
        return refuse(405, &why);
    }
    reply(200, "OK", pending_servers(&store.pending(snapshot)))
}

/// The latest pending change of each server, keyed `IP:PORT`.
pub fn pending_servers(changes: &[Change]) -> BTreeMap<String, u8> {
    changes
        .iter()
        .map(|c| (c.server.to_string(), c.removed as u8))
        .collect()
}

/// Every failure of `/ups` is a client error except a broken store: the
/// original interface has no 404 or 409, so those become 400 with a message
/// that says which it was.
fn status_of(e: &Error) -> u16 {
    match e {
        Error::Internal(_) => 500,
        Error::Busy(_) | Error::Owned(_) => 409,
        _ => 400,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    const LOCAL: (&str, &str) = (
        "local",
        "server 127.0.0.1:8088; server 127.0.0.1:8089 backup; server 127.0.0.1:8090;",
    );

    fn one(s: &str) -> Arg {
        Arg::One(s.into())
    }

    /// `PUT /ups?op=del&server=SERVER`, without `upstream=`.
    fn del(f: &StateFile, server: &str) -> Reply {
        handle(
            "PUT",
            &one("del"),
            &one(server),
            &Arg::Absent,
            f,
            &WriteOptions::default(),
        )
    }

    #[test]
    fn del_and_add_answer_in_the_original_shape() {
        let dir = TempDir::new();
        let f = dir.store(&[LOCAL]);
        let o = WriteOptions::default();
        let r = del(&f, "127.0.0.1:8088");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            r#"{"msg":"del a server success.","data":["127.0.0.1:8088"],"code":"A00001"}"#
        );
        assert!(f.read().unwrap().table.get("local").unwrap().servers[0].down);
        let r = handle(
            "GET",
            &one("add"),
            &one("127.0.0.1:8088"),
            &one("local"),
            &f,
            &o,
        );
        assert_eq!(
            r.body,
            r#"{"msg":"add a server success.","data":["127.0.0.1:8088"],"code":"A00001"}"#
        );
        assert!(!f.read().unwrap().table.get("local").unwrap().servers[0].down);
    }

    #[test]
    fn every_failure_is_e00001_with_a_plain_message_and_changes_nothing() {
        let dir = TempDir::new();
        let f = dir.store(&[LOCAL]);
        let o = WriteOptions::default();
        let before = f.read().unwrap().version;
        let cases = [
            (
                "PUT",
                Arg::Absent,
                one("127.0.0.1:8088"),
                Arg::Absent,
                400,
                "missing op",
            ),
            (
                "PUT",
                one("toggle"),
                one("127.0.0.1:8088"),
                Arg::Absent,
                400,
                "unknown op \"toggle\"",
            ),
            (
                "PUT",
                Arg::Many,
                one("127.0.0.1:8088"),
                Arg::Absent,
                400,
                "op is given more than once",
            ),
            (
                "PUT",
                one("del"),
                Arg::Absent,
                Arg::Absent,
                400,
                "missing server",
            ),
            (
                "PUT",
                one("del"),
                Arg::Flag,
                Arg::Absent,
                400,
                "missing server",
            ),
            (
                "PUT",
                one("del"),
                one("127.0.0.1"),
                Arg::Absent,
                400,
                "in no upstream",
            ),
            (
                "PUT",
                one("del"),
                one("host:80"),
                Arg::Absent,
                400,
                "is a host name",
            ),
            (
                "PUT",
                one("del"),
                one("127.0.0.1:9999"),
                Arg::Absent,
                400,
                "in no upstream",
            ),
            (
                "PUT",
                one("add"),
                one("127.0.0.1:8088"),
                one("nope"),
                400,
                "upstream nope not found",
            ),
            (
                "DELETE",
                one("del"),
                one("127.0.0.1:8088"),
                Arg::Absent,
                405,
                "method DELETE is not allowed",
            ),
        ];
        for (method, op, server, upstream, status, msg) in cases {
            let r = handle(method, &op, &server, &upstream, &f, &o);
            assert_eq!(r.status, status, "{r:?}");
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["code"], "E00001");
            assert!(
                v["msg"].as_str().unwrap().contains(msg),
                "{} lacks {msg}",
                v["msg"]
            );
            assert_eq!(v.as_object().unwrap().len(), 3);
            // The target server, as on a success (as nginx spells it: the
            // port is 80 when none is given); none when none is named.
            let want: Vec<String> = match &server {
                Arg::One(s) if s == "127.0.0.1" => vec!["127.0.0.1:80".into()],
                Arg::One(s) => vec![s.clone()],
                _ => vec![],
            };
            assert_eq!(v["data"], serde_json::json!(want), "{r:?}");
        }
        // Removing the last available server is refused and named.
        del(&f, "127.0.0.1:8088");
        del(&f, "127.0.0.1:8090");
        let r = del(&f, "127.0.0.1:8089");
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body,
            r#"{"msg":"refusing to remove 127.0.0.1:8089: it is the last available server of upstream local","data":["127.0.0.1:8089"],"code":"E00001"}"#
        );
        // As nginx spells it, without the parameters given.
        let r = handle(
            "PUT",
            &one("add"),
            &one("[0:0::1]:80 weight=0"),
            &one("local"),
            &f,
            &o,
        );
        assert_eq!(r.status, 400);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["data"], serde_json::json!(["[::1]:80"]));
        // What a user mistook for an address is named for what it is.
        for (server, why) in [
            (
                "http://127.0.0.1:8088",
                "has no scheme (http://): write \\\"127.0.0.1:8088\\\"",
            ),
            ("127.0.0.1:8088,127.0.0.1:8089", "one address, not a list"),
        ] {
            let r = del(&f, server);
            assert!(r.body.contains(why), "{}", r.body);
            assert!(
                r.body.contains(&format!("\"data\":[\"{server}\"]")),
                "{}",
                r.body
            );
        }
        assert_eq!(f.read().unwrap().version, before + 2);
    }

    #[test]
    fn check_reports_changes_a_worker_has_not_applied() {
        let dir = TempDir::new();
        let f = dir.store(&[LOCAL]);
        let me = std::process::id();
        let i = f.register_worker(me).unwrap();
        f.set_applied(i, f.generation());
        let snap = f.read().unwrap();
        assert_eq!(
            check("PUT", &f, &snap).body,
            r#"{"msg":"OK","data":{},"code":"A00001"}"#
        );
        del(&f, "127.0.0.1:8088");
        let snap = f.read().unwrap();
        assert_eq!(
            check("PUT", &f, &snap).body,
            r#"{"msg":"OK","data":{"127.0.0.1:8088":1},"code":"A00001"}"#
        );
        f.set_applied(i, snap.version);
        assert_eq!(
            check("GET", &f, &snap).body,
            r#"{"msg":"OK","data":{},"code":"A00001"}"#
        );
        assert_eq!(check("DELETE", &f, &snap).status, 405);
        f.release_worker(i, me);
    }
}
