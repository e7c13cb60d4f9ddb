//! What an operator can do to the table, with the rules every interface
//! shares (the Lua API, `/ups`, the REST shim). Each function changes a
//! `Table` in memory or fails leaving it as it was; the store makes the
//! change durable and visible, all or nothing.
//!
//! Over 600 lines: the tests at its end push it over; its code is under 600.

use crate::table::model::{
    check_name, Address, Owner, ServerPatch, ServerSpec, SyncMark, Table, Upstream, SERVERS_MAX,
    UPSTREAMS_MAX,
};
use crate::table::names::{Answers, NamedServer};
use crate::table::syntax::{
    only_backups, parse_address, parse_body, parse_server_line, parse_target, ServerLine, Target,
};
use crate::{Error, Result};

/// What [`put_upstreams`] did, by upstream name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Put {
    pub created: Vec<String>,
    pub replaced: Vec<String>,
    pub unchanged: Vec<String>,
    pub deleted: Vec<String>,
}

/// Creates or replaces each upstream of `given` (an upstream file's
/// table), in one change; with `replace`, also deletes every local
/// upstream `given` does not name, so that the table ends as `given` plus
/// the upstreams etcd owns (`dyups sync` writes those; naming one in
/// `given` is refused with [`Error::Owned`]). An upstream
/// that says the same as the one of its name is left as it is (its
/// balancing state and shared cells with it). Refused as a whole when an
/// upstream has too many servers or the table would hold too many.
pub fn put_upstreams(table: &mut Table, given: &Table, replace: bool) -> Result<Put> {
    for u in &given.upstreams {
        check_size(&u.name, u.servers.len())?;
        check_local(table, &u.name)?;
    }
    let mut put = Put::default();
    if replace {
        let keep: std::collections::HashSet<&str> = given.names().collect();
        put.deleted = table
            .upstreams
            .iter()
            .filter(|u| u.owner.is_local() && !keep.contains(u.name.as_str()))
            .map(|u| u.name.clone())
            .collect();
    }
    let kept = table.upstreams.len() - put.deleted.len();
    let created = given
        .upstreams
        .iter()
        .filter(|u| table.get(&u.name).is_none())
        .count();
    if created > 0 && kept + created > UPSTREAMS_MAX {
        return Err(Error::BadRequest(format!(
            "could not create {created} upstreams: the table would have {}, at most {UPSTREAMS_MAX} are allowed",
            kept + created
        )));
    }
    for name in &put.deleted {
        table.remove(name);
    }
    for u in &given.upstreams {
        let said = match table.get(&u.name) {
            // As written: a `server NAME` line the table holds resolved is
            // the same line, and is not asked again.
            Some(old) if old.same_content(u) || old.same_definition(u) => {
                put.unchanged.push(u.name.clone());
                continue;
            }
            Some(_) => &mut put.replaced,
            None => &mut put.created,
        };
        said.push(u.name.clone());
        // What the store keeps (revision, cells) is the store's to give.
        let mut fresh = Upstream::clone(u);
        fresh.rev = 0;
        fresh.peers.clear();
        table.upsert(fresh);
    }
    Ok(put)
}

/// Creates or replaces the upstream `name` with the servers of `body`
/// (`server ADDR [PARAMS];` lines): ngx_http_dyups_module's update.
pub fn update(table: &mut Table, name: &str, body: &str) -> Result<()> {
    check_name(name).map_err(Error::BadRequest)?;
    check_local(table, name)?;
    let upstream = parse_body(name, body)?;
    check_size(name, upstream.servers.len())?;
    if table.get(name).is_none() && table.upstreams.len() >= UPSTREAMS_MAX {
        return Err(Error::BadRequest(format!(
            "could not create upstream {name}: the table has {UPSTREAMS_MAX} upstreams, the most it takes"
        )));
    }
    table.upsert(upstream);
    Ok(())
}

/// Refuses a server the upstream's balancing method does not allow
/// (`backup` under `ip_hash`, `hash` and `random`, as nginx does).
fn fits_policy(u: &Upstream, s: &ServerSpec) -> Result<()> {
    u.policy
        .validate(std::slice::from_ref(s))
        .map_err(|why| Error::BadRequest(format!("upstream {}: {why}", u.name)))
}

/// Refuses adding a backup to an upstream with no primary server (one
/// emptied by deletes): nginx refuses an upstream of backups only.
fn no_backup_alone(u: &Upstream, s: &ServerSpec) -> Result<()> {
    if s.backup && primaries(u) == 0 {
        return Err(Error::BadRequest(only_backups(&u.name)));
    }
    Ok(())
}

/// Refuses an upstream of more than `SERVERS_MAX` servers.
fn check_size(name: &str, servers: usize) -> Result<()> {
    if servers > SERVERS_MAX {
        return Err(Error::BadRequest(format!(
            "upstream {name} would have {servers} servers, at most {SERVERS_MAX} are allowed"
        )));
    }
    Ok(())
}

/// Deletes the upstream `name`: ngx_http_dyups_module's delete.
pub fn delete(table: &mut Table, name: &str) -> Result<()> {
    check_name(name).map_err(Error::BadRequest)?;
    check_local(table, name)?;
    table.remove(name).map(drop).ok_or_else(|| not_found(name))
}

/// Puts `server` back into rotation: in the upstream `name`, appending it
/// when it is new there (`server` may carry parameters, `10.0.0.1:80
/// weight=2`), or, without a name, in every upstream that has it. Returns the
/// names of the upstreams it touched.
pub fn add_server(table: &mut Table, name: Option<&str>, server: &str) -> Result<Vec<String>> {
    let spec = match server_line(server)? {
        ServerLine::Addr(spec) => spec,
        ServerLine::Named(line) => return add_named(table, name, line),
    };
    let names = holders(table, name, &spec.addr, true)?;
    if names.is_empty() {
        // Only reachable with a name: the upstream exists but lacks it.
        let name = name.unwrap_or_default();
        let u = table.get_mut(name).ok_or_else(|| not_found(name))?;
        check_size(name, u.servers.len() + 1)?;
        no_backup_alone(u, &spec)?;
        fits_policy(u, &spec)?;
        u.servers.push(spec);
        return Ok(vec![name.to_owned()]);
    }
    for n in &names {
        if let Some(s) = table.get_mut(n).and_then(|u| u.server_mut(&spec.addr)) {
            s.down = false;
        }
    }
    Ok(names)
}

/// Takes `server` out of rotation (marks it `down`) in the upstream `name`,
/// or, without a name, in every upstream that has it. Refused as a whole if
/// any of those upstreams would be left with no server in rotation; doing it
/// again changes nothing. Returns the names of the upstreams it touched.
pub fn remove_server(table: &mut Table, name: Option<&str>, server: &str) -> Result<Vec<String>> {
    let addr =
        parse_address(server.trim()).map_err(|e| Error::BadRequest(format!("bad server: {e}")))?;
    let names = holders(table, name, &addr, false)?;
    // Check every upstream before changing any: the refusal is whole.
    for n in &names {
        let u = table.get(n).expect("holders returned it");
        if u.server(&addr).is_some_and(|s| s.in_rotation()) && u.in_rotation() == 1 {
            return Err(last_server(&addr, n));
        }
    }
    for n in &names {
        if let Some(s) = table.get_mut(n).and_then(|u| u.server_mut(&addr)) {
            s.down = true;
        }
    }
    Ok(names)
}

/// Appends one server (`IP:PORT [PARAMS]`, or a whole `server ...;` line)
/// to the upstream `name`; refused when the upstream has it already.
pub fn insert_server(table: &mut Table, name: &str, server: &str) -> Result<()> {
    check_name(name).map_err(Error::BadRequest)?;
    let spec = match server_line(server)? {
        ServerLine::Addr(spec) => spec,
        ServerLine::Named(line) => {
            check_local(table, name)?;
            let u = table.get(name).ok_or_else(|| not_found(name))?;
            if u.named(&line.host, line.port()).is_some() {
                return Err(Error::BadRequest(format!(
                    "upstream {name} already has server {}: change it with PATCH",
                    line.target()
                )));
            }
            return add_named(table, Some(name), line).map(drop);
        }
    };
    check_local(table, name)?;
    let u = table.get_mut(name).ok_or_else(|| not_found(name))?;
    if u.server(&spec.addr).is_some() {
        return Err(Error::BadRequest(format!(
            "upstream {name} already has server {}: change it with PATCH",
            spec.addr
        )));
    }
    check_size(name, u.servers.len() + 1)?;
    no_backup_alone(u, &spec)?;
    fits_policy(u, &spec)?;
    u.servers.push(spec);
    Ok(())
}

/// Changes some parameters of `server` in the upstream `name`; refused when
/// it would take the last server in rotation out of it.
pub fn patch_server(
    table: &mut Table,
    name: &str,
    server: &str,
    patch: &ServerPatch,
) -> Result<()> {
    let addr = match parse_target(server.trim()) {
        Ok(Target::Addr(a)) => a,
        Ok(Target::Name { .. }) => {
            // "bad server" as for any server PATCH cannot take: it changes
            // one address, and a name's addresses come from its answers.
            return Err(Error::BadRequest(format!(
                "bad server: {} is a host name, and PATCH changes one address (IP:PORT): \
                 a server NAME line is changed as a whole: send the upstream again \
                 (POST /upstream/{name}), or delete the line and add it anew",
                server.trim()
            )));
        }
        Err(e) => return Err(Error::BadRequest(format!("bad server: {e}"))),
    };
    check_name(name).map_err(Error::BadRequest)?;
    check_local(table, name)?;
    let u = table.get_mut(name).ok_or_else(|| not_found(name))?;
    from_a_name(u, &addr)?;
    let rotating = u.in_rotation();
    let s = u
        .server_mut(&addr)
        .ok_or_else(|| Error::NotFound(format!("upstream {name} has no server {addr}")))?;
    let mut changed = s.clone();
    patch.apply(&mut changed);
    if s.in_rotation() && !changed.in_rotation() && rotating == 1 {
        return Err(last_server(&addr, name));
    }
    if changed.backup && !s.backup && primaries(u) == 1 {
        return Err(Error::BadRequest(only_backups(&u.name)));
    }
    fits_policy(u, &changed)?;
    *u.server_mut(&addr).expect("found above") = changed;
    Ok(())
}

/// Removes `server` from the upstream `name` altogether, refusing to remove
/// the last server in rotation.
pub fn delete_server(table: &mut Table, name: &str, server: &str) -> Result<()> {
    let addr = match parse_target(server.trim()) {
        Ok(Target::Addr(a)) => a,
        Ok(Target::Name { host, port }) => {
            check_name(name).map_err(Error::BadRequest)?;
            check_local(table, name)?;
            let u = table.get_mut(name).ok_or_else(|| not_found(name))?;
            return delete_named(u, &host, port.unwrap_or(crate::table::model::DEFAULT_PORT));
        }
        Err(e) => return Err(Error::BadRequest(format!("bad server: {e}"))),
    };
    check_name(name).map_err(Error::BadRequest)?;
    check_local(table, name)?;
    let u = table.get_mut(name).ok_or_else(|| not_found(name))?;
    from_a_name(u, &addr)?;
    let at = u
        .servers
        .iter()
        .position(|s| s.addr == addr)
        .ok_or_else(|| Error::NotFound(format!("upstream {name} has no server {addr}")))?;
    if u.servers[at].in_rotation() && u.in_rotation() == 1 {
        return Err(last_server(&addr, name));
    }
    if !u.servers[at].backup && primaries(u) == 1 && u.servers.len() > 1 {
        return Err(Error::BadRequest(only_backups(&u.name)));
    }
    u.servers.remove(at);
    Ok(())
}

/// Appends the `server NAME` line `line` to the upstream `name` (or, with
/// no name, puts it back into rotation where it is): its addresses come
/// with the answers of the write ([`resolve_names`]).
fn add_named(table: &mut Table, name: Option<&str>, line: NamedServer) -> Result<Vec<String>> {
    let Some(name) = name else {
        return Err(Error::BadRequest(format!(
            "server {}: name the upstream to add a host name to",
            line.target()
        )));
    };
    check_name(name).map_err(Error::BadRequest)?;
    check_local(table, name)?;
    let u = table.get_mut(name).ok_or_else(|| not_found(name))?;
    if let Some(i) = u.named(&line.host, line.port()) {
        // Back into rotation, as for an address.
        u.names[i].params.down = false;
        for s in u.servers.iter_mut().filter(|s| s.from == Some(i as u16)) {
            s.down = false;
        }
        return Ok(vec![name.to_owned()]);
    }
    if u.names.len() >= crate::table::names::NAMES_MAX {
        return Err(Error::BadRequest(format!(
            "upstream {name} has {} server lines with a host name, the most it takes",
            u.names.len()
        )));
    }
    if line.params.backup && primaries(u) == 0 && !u.names.iter().any(|n| !n.params.backup) {
        return Err(Error::BadRequest(only_backups(&u.name)));
    }
    if let Some(why) = line.refused_by(&u.policy) {
        return Err(Error::BadRequest(format!("upstream {}: {why}", u.name)));
    }
    u.names.push(line);
    Ok(vec![name.to_owned()])
}

/// Removes the `server NAME` line `host:port` and every server it made,
/// refusing to take the last server in rotation.
fn delete_named(u: &mut Upstream, host: &str, port: u16) -> Result<()> {
    let i = u.named(host, port).ok_or_else(|| {
        Error::NotFound(format!("upstream {} has no server {host}:{port}", u.name))
    })?;
    let mut after = u.clone();
    after.servers.retain(|s| s.from != Some(i as u16));
    after.names.remove(i);
    for s in &mut after.servers {
        if let Some(f) = s.from.filter(|&f| usize::from(f) > i) {
            s.from = Some(f - 1);
        }
    }
    if after.in_rotation() == 0 && u.in_rotation() > 0 {
        return Err(Error::BadRequest(format!(
            "refusing to remove {host}:{port}: its servers are the last available ones of upstream {}",
            u.name
        )));
    }
    if !after.has_primary() && u.has_primary() && !after.servers.is_empty() {
        return Err(Error::BadRequest(only_backups(&u.name)));
    }
    after.peers.clear();
    *u = after;
    Ok(())
}

/// Refuses a per-server change to an address a `server NAME` line made:
/// the next answer would undo it; the line is what to change.
fn from_a_name(u: &Upstream, addr: &Address) -> Result<()> {
    match u.server(addr).and_then(|s| s.from) {
        Some(i) => Err(Error::BadRequest(format!(
            "server {addr} of upstream {} comes from `server {}`: change that line \
             (DELETE .../servers/{} and add it again, or send the upstream anew)",
            u.name,
            u.names[usize::from(i)].target(),
            u.names[usize::from(i)].target()
        ))),
        None => Ok(()),
    }
}

/// Gives the `server NAME` lines this change added their addresses, from
/// `answers` (gathered before the write, with cosockets or a blocking
/// client): a name that does not resolve refuses the change, naming it.
pub fn resolve_names(table: &mut Table, answers: &Answers) -> Result<()> {
    crate::table::names::resolve_pending(table, answers).map_err(Error::BadRequest)?;
    for u in &table.upstreams {
        check_size(&u.name, u.servers.len())?;
    }
    Ok(())
}

/// How many servers of `u` are not `backup`. A change that takes away the
/// last one is refused (an upstream that never had one, from before that
/// rule, may still be changed).
fn primaries(u: &Upstream) -> usize {
    u.servers.iter().filter(|s| !s.backup).count()
}

/// The upstreams `addr` is to be changed in: `name` alone (which must exist;
/// it must hold `addr` unless `may_lack`), or every upstream that holds it
/// (at least one).
fn holders(
    table: &Table,
    name: Option<&str>,
    addr: &Address,
    may_lack: bool,
) -> Result<Vec<String>> {
    match name {
        Some(name) => {
            check_name(name).map_err(Error::BadRequest)?;
            check_local(table, name)?;
            let u = table.get(name).ok_or_else(|| not_found(name))?;
            match u.server(addr) {
                Some(_) => Ok(vec![name.to_owned()]),
                None if may_lack => Ok(Vec::new()),
                None => Err(Error::NotFound(format!(
                    "upstream {name} has no server {addr}"
                ))),
            }
        }
        None => {
            // Refused as a whole: the server's other upstreams are not
            // changed either, so no host is left half-drained.
            for u in table.upstreams.iter().filter(|u| u.server(addr).is_some()) {
                check_local(table, &u.name)?;
            }
            let names: Vec<String> = table
                .upstreams
                .iter()
                .filter(|u| u.server(addr).is_some())
                .map(|u| u.name.clone())
                .collect();
            if names.is_empty() {
                return Err(Error::NotFound(format!(
                    "server {addr} is in no upstream{}",
                    if may_lack {
                        "; name the upstream to add it to"
                    } else {
                        ""
                    }
                )));
            }
            Ok(names)
        }
    }
}

/// What [`sync_upstreams`] did: as [`Put`], and the upstreams it could not
/// take, each with the reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub put: Put,
    pub skipped: Vec<(String, String)>,
}

/// `dyups sync`'s write: the upstreams etcd holds, given as the changes of
/// one etcd revision range, with `mark` as the table's sync mark, in one
/// change. Each of `puts` is created or replaced and becomes etcd's (a
/// local upstream of that name included: etcd is the fleet's source of
/// truth, and the agent logs the takeover); each of `deletes` is deleted if
/// etcd owns it (a local upstream of that name stays). With `full` (a read
/// of the whole prefix), every upstream etcd owns that neither `puts` nor
/// `keep` (keys whose value did not parse, whose last good upstream is
/// kept) names is deleted too. An upstream over the limits is skipped, not
/// the whole change: one bad key must not stop the rest of the fleet's.
pub fn sync_upstreams(
    table: &mut Table,
    mark: SyncMark,
    puts: Vec<Upstream>,
    deletes: &[String],
    keep: &[String],
    full: bool,
) -> Synced {
    use crate::table::model::name_key;
    use std::collections::{HashMap, HashSet};
    // Every name is looked up once in a map, never by `Table::get`: a full
    // read puts every upstream etcd has (up to UPSTREAMS_MAX), and a linear
    // search per name made it quadratic (over 10 minutes at 100,000).
    let mut done = Synced::default();
    let mut gone: HashSet<String> = deletes.iter().map(|n| name_key(n).into_owned()).collect();
    if full {
        let named: HashSet<std::borrow::Cow<str>> = keep
            .iter()
            .map(|n| name_key(n))
            .chain(puts.iter().map(|u| name_key(&u.name)))
            .collect();
        gone.extend(
            table
                .upstreams
                .iter()
                .filter(|u| !u.owner.is_local())
                .map(|u| name_key(&u.name))
                .filter(|k| !named.contains(k))
                .map(|k| k.into_owned()),
        );
    }
    if !gone.is_empty() {
        table.upstreams.retain(|u| {
            let go = !u.owner.is_local() && gone.contains(name_key(&u.name).as_ref());
            if go {
                done.put.deleted.push(u.name.clone());
            }
            !go
        });
    }
    // Where each name put is in the table: one pass, hashing the table's
    // names against the (usually few) names put, allocating only for those.
    let mut at: HashMap<String, Option<usize>> = puts
        .iter()
        .map(|u| (name_key(&u.name).into_owned(), None))
        .collect();
    for (i, u) in table.upstreams.iter().enumerate() {
        if let Some(found) = at.get_mut(name_key(&u.name).as_ref()) {
            *found = Some(i);
        }
    }
    for mut u in puts {
        if let Err(e) = check_size(&u.name, u.servers.len()) {
            done.skipped.push((u.name.clone(), e.to_string()));
            continue;
        }
        u.owner = Owner::Etcd;
        u.rev = 0;
        u.peers.clear();
        let key = name_key(&u.name).into_owned();
        match at.get(&key).copied().flatten() {
            Some(i) => {
                let old = &table.upstreams[i];
                if old.same_content(&u) {
                    done.put.unchanged.push(u.name);
                    continue;
                }
                // A replaced upstream keeps its spelling, as `upsert` does.
                u.name.clone_from(&old.name);
                done.put.replaced.push(u.name.clone());
                table.upstreams[i] = std::sync::Arc::new(u);
            }
            None if table.upstreams.len() >= UPSTREAMS_MAX => {
                done.skipped.push((
                    u.name.clone(),
                    format!("the table has {UPSTREAMS_MAX} upstreams, the most it takes"),
                ));
            }
            None => {
                done.put.created.push(u.name.clone());
                at.insert(key, Some(table.upstreams.len()));
                table.upstreams.push(std::sync::Arc::new(u));
            }
        }
    }
    table.sync = Some(mark);
    done
}

/// Refuses a local write to the upstream `name` when etcd owns it.
fn check_local(table: &Table, name: &str) -> Result<()> {
    match table.get(name) {
        Some(u) if !u.owner.is_local() => {
            let key = table.sync.as_ref().map_or_else(
                || format!("upstreams/{} under dyups sync's --prefix", u.name),
                |m| m.key_of(&u.name),
            );
            Err(Error::Owned(format!(
                "upstream {} belongs to etcd (dyups sync writes it): write it to etcd key {key}, \
                 which every host follows; a local change would be undone by the next one there",
                u.name
            )))
        }
        _ => Ok(()),
    }
}

/// One server as an operator writes it: `IP:PORT [PARAMS]` or `NAME[:PORT]
/// [PARAMS] [resolve]`, or the same as a whole `server ...;` line.
fn server_line(text: &str) -> Result<ServerLine> {
    let text = text.trim();
    let text = text
        .strip_prefix("server")
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .unwrap_or(text);
    let text = text.trim().strip_suffix(';').unwrap_or(text.trim());
    parse_server_line(text).map_err(|e| Error::BadRequest(format!("bad server: {e}")))
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("upstream {name} not found"))
}

fn last_server(addr: &Address, name: &str) -> Error {
    Error::BadRequest(format!(
        "refusing to remove {addr}: it is the last available server of upstream {name}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::syntax::parse_body;

    fn table() -> Table {
        let mut t = Table::default();
        update(
            &mut t,
            "local",
            "server 127.0.0.1:8088; server 127.0.0.1:8089 backup; server 127.0.0.1:8090;",
        )
        .unwrap();
        update(
            &mut t,
            "other",
            "server 127.0.0.1:8090; server 127.0.0.1:8091;",
        )
        .unwrap();
        t
    }

    fn down(t: &Table, name: &str) -> Vec<u16> {
        t.get(name)
            .unwrap()
            .servers
            .iter()
            .filter(|s| s.down)
            .map(|s| s.addr.port())
            .collect()
    }

    #[test]
    fn a_backup_is_never_added_to_an_upstream_without_a_primary() {
        // Found by tests/properties.rs: a down lone server deleted, then a
        // backup added, left an upstream nginx (and our parser) refuses.
        let mut t = Table::default();
        update(&mut t, "a", "server [::1]:8001 down;").unwrap();
        delete_server(&mut t, "a", "[::1]:8001").unwrap();
        let before = t.clone();
        let err = add_server(&mut t, Some("a"), "127.0.0.1:8001 backup").unwrap_err();
        assert!(err.to_string().contains("only backup servers"), "{err}");
        let err = insert_server(&mut t, "a", "127.0.0.1:8001 backup").unwrap_err();
        assert!(err.to_string().contains("only backup servers"), "{err}");
        assert_eq!(t, before);
        add_server(&mut t, Some("a"), "127.0.0.1:8002").unwrap();
        add_server(&mut t, Some("a"), "127.0.0.1:8001 backup").unwrap();
    }

    #[test]
    fn put_upstreams_creates_replaces_keeps_and_with_replace_deletes() {
        let mut t = table();
        let kept = t.upstreams[1].clone();
        let given = crate::table::syntax::parse_upstream_file(
            "upstream other { server 127.0.0.1:8090; server 127.0.0.1:8091; }\n\
             upstream local { server 10.0.0.1:80; }\n\
             upstream new { least_conn; server 10.0.0.2:80; }",
        )
        .unwrap();
        let put = put_upstreams(&mut t, &given, false).unwrap();
        assert_eq!(
            put,
            Put {
                created: vec!["new".into()],
                replaced: vec!["local".into()],
                unchanged: vec!["other".into()],
                deleted: vec![],
            }
        );
        // The unchanged upstream is the same one: its balancing state stays.
        assert!(std::sync::Arc::ptr_eq(&t.upstreams[1], &kept));
        assert_eq!(t.names().collect::<Vec<_>>(), ["local", "other", "new"]);
        assert_eq!(t.get("local").unwrap().servers.len(), 1);

        let only =
            crate::table::syntax::parse_upstream_file("upstream new { server 10.0.0.3:80; }")
                .unwrap();
        let put = put_upstreams(&mut t, &only, true).unwrap();
        assert_eq!(put.deleted, ["local", "other"]);
        assert_eq!(put.replaced, ["new"]);
        assert_eq!(t.names().collect::<Vec<_>>(), ["new"]);
        // Putting it again changes nothing.
        let before = t.clone();
        let put = put_upstreams(&mut t, &only, true).unwrap();
        assert_eq!(put.unchanged, ["new"]);
        assert_eq!(t, before);
    }

    #[test]
    fn put_upstreams_refuses_as_a_whole() {
        let mut t = table();
        let before = t.clone();
        let big: String = (0..=SERVERS_MAX)
            .map(|i| format!("server 10.0.{}.{}:80;", i / 250, i % 250 + 1))
            .collect();
        let given = crate::table::syntax::parse_upstream_file(&format!(
            "upstream fine {{ server 10.0.0.1:80; }} upstream big {{ {big} }}"
        ))
        .unwrap();
        let err = put_upstreams(&mut t, &given, true).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(
            err.to_string()
                .contains("upstream big would have 1001 servers"),
            "{err}"
        );
        assert_eq!(t, before);
    }

    #[test]
    fn update_creates_replaces_and_rejects_bad_input_unchanged() {
        let mut t = table();
        update(&mut t, "local", "server 10.0.0.1:80 weight=2;").unwrap();
        assert_eq!(t.get("local").unwrap().servers.len(), 1);
        assert_eq!(t.names().collect::<Vec<_>>(), ["local", "other"]);
        let before = t.clone();
        for (name, body) in [
            ("bad name", "server 10.0.0.1;"),
            ("x", ""),
            ("x", "server 10.0.0.1 weight=0;"),
        ] {
            assert_eq!(update(&mut t, name, body).unwrap_err().status(), 400);
        }
        assert_eq!(t, before);
    }

    fn synced(t: &mut Table, bodies: &[(&str, &str)], deletes: &[&str], full: bool) -> Synced {
        let puts = bodies
            .iter()
            .map(|(n, b)| parse_body(n, b).unwrap())
            .collect();
        let deletes: Vec<String> = deletes.iter().map(|d| d.to_string()).collect();
        let mark = SyncMark {
            revision: 7,
            cluster_id: 1,
            prefix: "/p/".into(),
        };
        sync_upstreams(t, mark, puts, &deletes, &[], full)
    }

    #[test]
    fn every_local_write_to_an_upstream_etcd_owns_is_409_and_changes_nothing() {
        let mut t = table();
        synced(&mut t, &[("owned", "server 127.0.0.1:7000;")], &[], false);
        let before = t.clone();
        let given =
            crate::table::syntax::parse_upstream_file("upstream owned { server 1.1.1.1:1; }")
                .unwrap();
        let refused = [
            update(&mut t, "owned", "server 10.0.0.1:80;").unwrap_err(),
            delete(&mut t, "OWNED").unwrap_err(),
            insert_server(&mut t, "owned", "10.0.0.1:80").unwrap_err(),
            add_server(&mut t, Some("owned"), "10.0.0.1:80").unwrap_err(),
            remove_server(&mut t, Some("owned"), "127.0.0.1:7000").unwrap_err(),
            remove_server(&mut t, None, "127.0.0.1:7000").unwrap_err(),
            patch_server(&mut t, "owned", "127.0.0.1:7000", &ServerPatch::default()).unwrap_err(),
            delete_server(&mut t, "owned", "127.0.0.1:7000").unwrap_err(),
            put_upstreams(&mut t, &given, false).unwrap_err(),
        ];
        for e in refused {
            assert_eq!(e.status(), 409, "{e}");
            assert!(
                e.to_string()
                    .contains("write it to etcd key /p/upstreams/owned"),
                "{e}"
            );
        }
        assert_eq!(t, before);
        // --replace leaves etcd's upstreams alone; local ones stay writable.
        let only =
            crate::table::syntax::parse_upstream_file("upstream other { server 1.1.1.1:1; }")
                .unwrap();
        let put = put_upstreams(&mut t, &only, true).unwrap();
        assert_eq!(put.deleted, ["local"]);
        assert_eq!(t.names().collect::<Vec<_>>(), ["other", "owned"]);
    }

    #[test]
    fn sync_takes_over_deletes_only_its_own_and_a_full_read_keeps_bad_keys() {
        let mut t = table();
        let done = synced(
            &mut t,
            &[
                ("a", "server 127.0.0.1:1;"),
                ("b", "server 127.0.0.1:2;"),
                ("other", "server 127.0.0.1:3;"),
            ],
            &["local"],
            false,
        );
        assert_eq!(done.put.created, ["a", "b"]);
        assert_eq!(done.put.replaced, ["other"]);
        // A delete in etcd of a name only a local upstream has: it stays.
        assert!(done.put.deleted.is_empty());
        assert!(t.get("local").unwrap().owner.is_local());
        assert_eq!(t.get("other").unwrap().owner, Owner::Etcd);
        assert_eq!(t.sync.as_ref().unwrap().revision, 7);
        // A full read naming only `a`, with `b`'s value unparsable.
        let puts = vec![parse_body("a", "server 127.0.0.1:1;").unwrap()];
        let mark = t.sync.clone().unwrap();
        let done = sync_upstreams(&mut t, mark, puts, &[], &["B".into()], true);
        assert_eq!(done.put.deleted, ["other"]);
        assert_eq!(done.put.unchanged, ["a"]);
        assert_eq!(t.names().collect::<Vec<_>>(), ["local", "a", "b"]);
    }

    #[test]
    fn sync_pairs_names_in_any_case_and_a_later_put_of_a_name_wins() {
        let mut t = table();
        synced(&mut t, &[("Mixed", "server 127.0.0.1:1;")], &[], false);
        // Keys differ in case, names do not: one upstream, the last value,
        // the spelling it was created with.
        let done = synced(
            &mut t,
            &[
                ("MIXED", "server 127.0.0.1:2;"),
                ("new", "server 127.0.0.1:3;"),
                ("NEW", "server 127.0.0.1:4;"),
            ],
            &[],
            true,
        );
        assert_eq!(done.put.replaced, ["Mixed", "new"]);
        assert_eq!(done.put.created, ["new"]);
        assert_eq!(
            t.names().collect::<Vec<_>>(),
            ["local", "other", "Mixed", "new"]
        );
        assert_eq!(
            t.get("mixed").unwrap().servers[0].addr.to_string(),
            "127.0.0.1:2"
        );
        assert_eq!(
            t.get("new").unwrap().servers[0].addr.to_string(),
            "127.0.0.1:4"
        );
        // A delete in another case deletes it; a full read without it too.
        let done = synced(&mut t, &[], &["mIXED"], false);
        assert_eq!(done.put.deleted, ["Mixed"]);
        let done = synced(&mut t, &[], &[], true);
        assert_eq!(done.put.deleted, ["new"]);
        assert_eq!(t.names().collect::<Vec<_>>(), ["local", "other"]);
    }

    #[test]
    fn delete_of_an_unknown_upstream_is_404() {
        let mut t = table();
        assert_eq!(delete(&mut t, "nope").unwrap_err().status(), 404);
        delete(&mut t, "other").unwrap();
        assert!(t.get("other").is_none());
    }

    #[test]
    fn remove_without_a_name_takes_the_server_out_everywhere() {
        let mut t = table();
        let names = remove_server(&mut t, None, "127.0.0.1:8090").unwrap();
        assert_eq!(names, ["local", "other"]);
        assert_eq!(down(&t, "local"), [8090]);
        assert_eq!(down(&t, "other"), [8090]);
        // Idempotent.
        let again = t.clone();
        remove_server(&mut t, None, "127.0.0.1:8090").unwrap();
        assert_eq!(t, again);
    }

    #[test]
    fn the_last_server_in_rotation_is_never_removed_and_the_refusal_is_whole() {
        let mut t = table();
        remove_server(&mut t, Some("other"), "127.0.0.1:8091").unwrap();
        let before = t.clone();
        // 8090 is the last of "other": refusing leaves "local" untouched too.
        let err = remove_server(&mut t, None, "127.0.0.1:8090").unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(
            err.to_string()
                .contains("last available server of upstream other"),
            "{err}"
        );
        assert_eq!(t, before);
        assert_eq!(
            delete_server(&mut t, "other", "127.0.0.1:8090")
                .unwrap_err()
                .status(),
            400
        );
        // A backup in rotation counts as available.
        remove_server(&mut t, Some("local"), "127.0.0.1:8088").unwrap();
        remove_server(&mut t, Some("local"), "127.0.0.1:8090").unwrap();
        assert!(remove_server(&mut t, Some("local"), "127.0.0.1:8089").is_err());
    }

    #[test]
    fn add_restores_or_appends() {
        let mut t = table();
        remove_server(&mut t, None, "127.0.0.1:8090").unwrap();
        assert_eq!(
            add_server(&mut t, None, "127.0.0.1:8090").unwrap(),
            ["local", "other"]
        );
        assert!(down(&t, "local").is_empty() && down(&t, "other").is_empty());
        add_server(&mut t, Some("other"), "127.0.0.1:9000 weight=5").unwrap();
        let s = t.get("other").unwrap().servers.last().unwrap().clone();
        assert_eq!((s.addr.port(), s.weight), (9000, 5));
        add_server(&mut t, Some("other"), "server 127.0.0.1:9002 weight=2;").unwrap();
        let s = t.get("other").unwrap().servers.last().unwrap().clone();
        assert_eq!((s.addr.port(), s.weight), (9002, 2));
    }

    #[test]
    fn insert_and_patch_change_one_server() {
        let mut t = table();
        insert_server(&mut t, "other", "server 127.0.0.1:9000 weight=2;").unwrap();
        insert_server(&mut t, "other", "127.0.0.1:9001").unwrap();
        assert_eq!(
            insert_server(&mut t, "other", "127.0.0.1:9001")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            insert_server(&mut t, "nope", "127.0.0.1:9001")
                .unwrap_err()
                .status(),
            404
        );
        let patch = ServerPatch {
            weight: Some(7),
            down: Some(true),
            ..ServerPatch::default()
        };
        patch_server(&mut t, "other", "127.0.0.1:9000", &patch).unwrap();
        let s = t
            .get("other")
            .unwrap()
            .server(&parse_address("127.0.0.1:9000").unwrap())
            .unwrap();
        assert_eq!((s.weight, s.down), (7, true));
        assert_eq!(
            patch_server(&mut t, "other", "127.0.0.1:1", &patch)
                .unwrap_err()
                .status(),
            404
        );
        // Taking the last server in rotation down is refused.
        let down = ServerPatch {
            down: Some(true),
            ..ServerPatch::default()
        };
        patch_server(&mut t, "other", "127.0.0.1:8090", &down).unwrap();
        patch_server(&mut t, "other", "127.0.0.1:8091", &down).unwrap();
        let before = t.clone();
        assert_eq!(
            patch_server(&mut t, "other", "127.0.0.1:9001", &down)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(t, before);
    }

    #[test]
    fn the_last_primary_is_never_made_or_left_a_backup() {
        let mut t = table();
        let before = t.clone();
        let backup = ServerPatch {
            backup: Some(true),
            ..ServerPatch::default()
        };
        patch_server(&mut t, "local", "127.0.0.1:8088", &backup).unwrap();
        // 8090 is now the only primary of "local" (8089 is a backup).
        let err = patch_server(&mut t, "local", "127.0.0.1:8090", &backup).unwrap_err();
        assert_eq!(
            err.to_string(),
            "upstream \"local\" would have only backup servers: nginx refuses that (\"no servers in upstream\")"
        );
        let err = delete_server(&mut t, "local", "127.0.0.1:8090").unwrap_err();
        assert!(err.to_string().contains("only backup servers"), "{err}");
        // A backup may go, and the last primary may become one again.
        delete_server(&mut t, "local", "127.0.0.1:8089").unwrap();
        let primary = ServerPatch {
            backup: Some(false),
            ..ServerPatch::default()
        };
        patch_server(&mut t, "local", "127.0.0.1:8088", &primary).unwrap();
        assert_ne!(t, before);
        assert_eq!(
            update(&mut t, "x", "server 10.0.0.1 backup;")
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn names_match_in_any_case_and_keep_their_spelling() {
        let mut t = Table::default();
        update(&mut t, "Foo.Example", "server 10.0.0.1:80;").unwrap();
        assert_eq!(t.get("foo.example").unwrap().name, "Foo.Example");
        // Replaced under another spelling: one upstream, first spelling.
        update(&mut t, "FOO.example", "server 10.0.0.2:80;").unwrap();
        assert_eq!(t.names().collect::<Vec<_>>(), ["Foo.Example"]);
        assert_eq!(t.get("foo.EXAMPLE").unwrap().servers[0].addr.port(), 80);
        insert_server(&mut t, "foo.example", "10.0.0.3:80").unwrap();
        remove_server(&mut t, Some("FOO.EXAMPLE"), "10.0.0.3:80").unwrap();
        assert_eq!(
            add_server(&mut t, None, "10.0.0.3:80").unwrap(),
            ["Foo.Example"]
        );
        delete(&mut t, "foo.example").unwrap();
        assert!(t.upstreams.is_empty());
    }

    #[test]
    fn per_server_changes_keep_the_upstreams_settings() {
        let mut t = Table::default();
        update(
            &mut t,
            "c",
            "server 10.0.0.1:80; server 10.0.0.2:80; check interval=3000 rise=2 fall=5 timeout=1000;\
             keepalive_timeout 30s;",
        )
        .unwrap();
        let settings = |t: &Table| {
            let u = t.get("c").unwrap();
            (u.check.clone(), u.keepalive_timeout)
        };
        let before = settings(&t);
        assert!(before.0.line.is_some());
        insert_server(&mut t, "c", "10.0.0.3:80 max_conns=4").unwrap();
        remove_server(&mut t, None, "10.0.0.1:80").unwrap();
        add_server(&mut t, Some("c"), "10.0.0.1:80").unwrap();
        let patch = ServerPatch {
            max_conns: Some(2),
            ..ServerPatch::default()
        };
        patch_server(&mut t, "c", "10.0.0.2:80", &patch).unwrap();
        delete_server(&mut t, "c", "10.0.0.3:80").unwrap();
        assert_eq!(settings(&t), before);
        assert_eq!(t.get("c").unwrap().servers[1].max_conns, 2);
        // An update replaces the whole definition, settings included.
        update(&mut t, "c", "server 10.0.0.1:80;").unwrap();
        assert_eq!(t.get("c").unwrap().check.line, None);
    }

    #[test]
    fn limits_are_enforced_and_reaching_one_changes_nothing() {
        let mut t = table();
        let body = |n: u16| {
            (1..=n)
                .map(|p| format!("server 10.0.0.1:{p};"))
                .collect::<String>()
        };
        update(&mut t, "big", &body(SERVERS_MAX as u16)).unwrap();
        let before = t.clone();
        let err = update(&mut t, "bigger", &body(SERVERS_MAX as u16 + 1)).unwrap_err();
        assert!(
            err.to_string()
                .contains("would have 1001 servers, at most 1000"),
            "{err}"
        );
        assert_eq!(
            insert_server(&mut t, "big", "10.0.0.2:1")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            add_server(&mut t, Some("big"), "10.0.0.2:1")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(t, before);

        let mut full = Table::default();
        for i in 0..UPSTREAMS_MAX {
            full.upstreams
                .push(Upstream::new(format!("u{i}"), vec![]).into());
        }
        let err = update(&mut full, "one-more", "server 10.0.0.1:1;").unwrap_err();
        assert!(err.to_string().contains("the most it takes"), "{err}");
        update(&mut full, "u7", "server 10.0.0.1:1;").unwrap();
    }

    #[test]
    fn unknown_servers_and_upstreams_are_404_and_bad_addresses_400() {
        let mut t = table();
        assert_eq!(
            add_server(&mut t, None, "127.0.0.1:9999")
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            remove_server(&mut t, None, "127.0.0.1:9999")
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            remove_server(&mut t, Some("local"), "127.0.0.1:9999")
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            add_server(&mut t, Some("nope"), "127.0.0.1:9999")
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            remove_server(&mut t, None, "example.com:80")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            add_server(&mut t, None, "127.0.0.1:8088 weight=0")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(t, table());
    }
}
