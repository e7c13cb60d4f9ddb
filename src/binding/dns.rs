//! Host names, as Lua sees them: the lookups a write needs before its
//! turn, made with cosockets by `dns.lua` (the messages are `crate::dns`'s),
//! or, where no cosocket is (init_worker, LuaJIT outside nginx), with the
//! blocking client; and the resolver's round on each refresh tick, in the
//! worker that holds the resolver lease.

use mlua::{AnyUserData, FromLuaMulti, Function, Lua, LuaString, Table, UserData, Value, Variadic};
use parking_lot::Mutex;

use super::config::{config, Config};
use super::hot_path::WORKER;
use super::ngx_api::log;
use super::write_api::Turn;
use crate::admin::{name_status, ops};
use crate::dns::schedule::{Schedule, Update};
use crate::dns::wire::{self, Reply, TYPE_SRV};
use crate::dns::{self as client, lease, Defaults, Resolver};
use crate::table::model::{Table as UpstreamTable, Upstream};
use crate::table::names::{apply_lookup, Answers, Applied, Lookup, Query};

/// Which lookup a dns.lua entry is: its `host` (the name asked), `ipv6`
/// and `srv` fields.
fn query_of(entry: &Table) -> LuaResult<Query> {
    Ok(Query {
        host: entry.get::<String>("host")?.to_ascii_lowercase(),
        ipv6: entry.get("ipv6")?,
        srv: entry.get::<Option<bool>>("srv")?.unwrap_or(false),
    })
}

type LuaResult<T> = mlua::Result<T>;

/// The answers a write gathered before its turn (dns.lua), for the turn.
pub(super) struct AnswersHandle(pub Answers);

impl UserData for AnswersHandle {}

/// A change an answer of the resolver asks for, to be written in a turn.
struct UpdateHandle(Update);

impl UserData for UpdateHandle {}

/// The resolver's schedule, in the worker that holds the lease.
static SCHEDULE: Mutex<Option<Schedule>> = Mutex::new(None);
/// The last error logged per `resolve` line, so that one failing for a
/// minute logs once, and its recovery once.
static LOGGED: Mutex<Vec<(String, String, Option<String>)>> = Mutex::new(Vec::new());

/// init's `resolver` (a `resolver` line's arguments) and
/// `resolver_timeout` (seconds), or `/etc/resolv.conf`.
pub(super) fn defaults_option(opts: &Table) -> Result<Defaults, String> {
    let timeout_ms = match opts.get::<Value>("resolver_timeout").unwrap_or(Value::Nil) {
        Value::Nil => None,
        Value::Integer(n) if n > 0 => Some((n * 1000) as u32),
        Value::Number(n) if n > 0.0 && n <= 86_400.0 => Some((n * 1000.0) as u32),
        v => {
            return Err(format!(
                "option resolver_timeout must be a number of seconds, not {}",
                super::arguments::type_name(&v)
            ))
        }
    };
    match opts.get::<Value>("resolver").unwrap_or(Value::Nil) {
        Value::Nil => Ok(Defaults {
            timeout_ms: timeout_ms.unwrap_or(Defaults::default().timeout_ms),
            ..Defaults::system()
        }),
        Value::String(s) => Defaults::from_option(&s.to_string_lossy(), timeout_ms),
        v => Err(format!(
            "option resolver must be a string such as \"10.0.0.53 valid=30s\", not {}",
            super::arguments::type_name(&v)
        )),
    }
}

/// The answers a write in `turn` takes for the host names it adds: those
/// dns.lua gathered with cosockets, or, without a turn (a phase that may
/// not yield, where the write blocks anyway), found now with the blocking
/// client, the names told by trying the change (`dry`) on the current
/// table. `None`: the write adds no name.
pub(super) fn answers_for(
    turn: &Turn,
    cfg: &Config,
    dry: impl FnOnce(&mut UpstreamTable) -> crate::Result<()>,
) -> Option<Answers> {
    if let Some(t) = turn {
        return t.answers.clone();
    }
    let mut table = current_table()?;
    dry(&mut table).ok()?;
    table
        .upstreams
        .iter()
        .any(|u| u.has_pending())
        .then(|| client::answers_blocking(&table, &cfg.dns))
}

/// The table this process sees now.
fn current_table() -> Option<UpstreamTable> {
    super::read_api::with_snapshot(|_, s| s.table.clone()).ok()
}

pub(super) fn register(lua: &Lua, raw: &Table) -> LuaResult<()> {
    raw.set("dns_plan", lua.create_function(plan)?)?;
    raw.set(
        "dns_read",
        lua.create_function(|_, (q, r): (LuaString, LuaString)| {
            Ok(match wire::read_reply(&q.as_bytes(), &r.as_bytes()) {
                Ok(Reply::Truncated) => Some("truncated"),
                Ok(_) => Some("ok"),
                Err(_) => None,
            })
        })?,
    )?;
    raw.set("dns_answers", lua.create_function(answers)?)?;
    raw.set("dns_targets", lua.create_function(targets)?)?;
    raw.set("dns_due", lua.create_function(due)?)?;
    raw.set("dns_record", lua.create_function(record)?)?;
    raw.set("dns_apply", lua.create_function(apply)?)?;
    raw.set(
        "dns_release",
        lua.create_function(|_, ()| {
            if let Some(w) = WORKER.lock().as_ref() {
                lease::release(w.store().resolver_lease(), std::process::id());
            }
            Ok(())
        })?,
    )?;
    let round: Function = lua
        .load(include_str!("dns.lua"))
        .set_name("=ngx.dyups.dns")
        .call(raw)?;
    lua.set_named_registry_value("ngx.dyups.dns_round", round)
}

/// The resolver's round, run after each refresh tick (dns.lua).
pub(super) fn round(lua: &Lua) -> LuaResult<Function> {
    lua.named_registry_value("ngx.dyups.dns_round")
}

/// One lookup as dns.lua makes it: the messages to send (one per record
/// type asked: A and AAAA, or SRV) and where.
fn lookup_entry(lua: &Lua, q: &Query, resolver: &Resolver) -> LuaResult<Table> {
    let servers = lua.create_table()?;
    for a in &resolver.servers {
        let s = lua.create_table()?;
        s.set("host", a.ip().to_string())?;
        s.set("port", a.port())?;
        servers.push(s)?;
    }
    entry_with(
        lua,
        q,
        servers,
        f64::from(resolver.attempt_ms()) / 1000.0,
        resolver.types(),
    )
}

/// The entry of lookup `q`, to the name servers `servers`, `attempt`
/// seconds each, asking for `types` (SRV alone for an SRV query).
fn entry_with(
    lua: &Lua,
    q: &Query,
    servers: Table,
    attempt: f64,
    types: &[u16],
) -> LuaResult<Table> {
    let e = lua.create_table()?;
    e.set("host", q.host.as_str())?;
    e.set("ipv6", q.ipv6)?;
    e.set("srv", q.srv)?;
    e.set("attempt", attempt)?;
    e.set("servers", servers)?;
    let packets = lua.create_table()?;
    let srv = [TYPE_SRV];
    for &t in if q.srv { &srv[..] } else { types } {
        packets.push(lua.create_string(wire::query(client::random_id(), &q.host, t))?)?;
    }
    e.set("packets", packets)?;
    Ok(e)
}

/// What an entry's replies say, one per packet: the reply read against
/// its query, or the transport's error.
fn replies_of(entry: &Table) -> LuaResult<Vec<Result<Reply, String>>> {
    let packets: Vec<LuaString> = entry.get("packets")?;
    let replies: Table = entry.get("replies")?;
    let errors: Table = entry.get("errors")?;
    let mut out = Vec::with_capacity(packets.len());
    for (i, q) in packets.iter().enumerate() {
        let reply: Option<LuaString> = replies.get(i + 1).ok().flatten();
        out.push(match reply {
            Some(r) => wire::read_reply(&q.as_bytes(), &r.as_bytes()),
            None => Err(errors
                .get::<Option<String>>(i + 1)?
                .unwrap_or_else(|| "no answer".into())),
        });
    }
    Ok(out)
}

/// The SRV records an SRV entry's reply holds, or the lookup's end.
fn records_of(entry: &Table, host: &str) -> LuaResult<Result<(Vec<wire::SrvRecord>, u32), Lookup>> {
    let reply = replies_of(entry)?
        .into_iter()
        .next()
        .unwrap_or_else(|| Err("no answer".into()));
    Ok(client::service_records(host, reply))
}

/// What the replies dns.lua gathered for an entry say: one [`Lookup`];
/// for an SRV entry, with the lookups of its targets (`targets`, the
/// entries [`targets`] made).
fn lookup_of(entry: &Table) -> LuaResult<Lookup> {
    let host: String = entry.get("host")?;
    if entry.get::<Table>("servers")?.raw_len() == 0 {
        return Ok(Lookup::Failed(format!(
            "{host}: no resolver: give a `resolver` line, init's resolver option, or \
             nameservers in {}",
            client::RESOLV_CONF
        )));
    }
    if !query_of(entry)?.srv {
        return Ok(client::combine(&host, &replies_of(entry)?));
    }
    let (records, ttl) = match records_of(entry, &host)? {
        Ok(found) => found,
        Err(end) => return Ok(end),
    };
    let mut found = Vec::new();
    if let Some(subs) = entry.get::<Option<Table>>("targets")? {
        for sub in subs.sequence_values::<Table>() {
            let sub = sub?;
            found.push((sub.get::<String>("host")?, lookup_of(&sub)?));
        }
    }
    Ok(client::combine_service(&host, &records, ttl, &found))
}

/// `raw.dns_targets(entry)`: for an SRV entry whose reply came, the
/// address lookups of its records' targets, to the same name servers;
/// nil when there is nothing to ask.
fn targets(lua: &Lua, entry: Table) -> LuaResult<Option<Table>> {
    let q = query_of(&entry)?;
    if !q.srv {
        return Ok(None);
    }
    let Ok((records, _)) = records_of(&entry, &q.host)? else {
        return Ok(None);
    };
    let servers: Table = entry.get("servers")?;
    let attempt: f64 = entry.get("attempt")?;
    let types = client::address_types(q.ipv6);
    let list = lua.create_table()?;
    for host in client::service_targets(&records) {
        let sub = Query::new(&host, q.ipv6);
        list.push(entry_with(lua, &sub, servers.clone(), attempt, types)?)?;
    }
    Ok(Some(list))
}

/// `raw.dns_plan(kind, ...)`: the lookups the write `kind` (`update`,
/// `add_server`, `api`) with these arguments needs, tried on the current
/// table: a list of entries for dns.lua, or nil when it adds no name (or
/// is refused anyway: the write itself says why).
fn plan(lua: &Lua, args: Variadic<Value>) -> LuaResult<Option<Table>> {
    let text = |i: usize| match args.get(i) {
        Some(Value::String(s)) => Some(s.to_string_lossy()),
        _ => None,
    };
    let (Ok(cfg), Some(mut table)) = (config(), current_table()) else {
        return Ok(None);
    };
    let tried = match text(0).as_deref() {
        Some("update") => match (text(1), text(2)) {
            (Some(name), Some(body)) => ops::update(&mut table, &name, &body).is_ok(),
            _ => false,
        },
        Some("add_server") => match text(2) {
            Some(server) => ops::add_server(&mut table, text(1).as_deref(), &server).is_ok(),
            None => false,
        },
        Some("api") => api_planned(lua, &cfg, &args, &mut table)?,
        _ => false,
    };
    if !tried {
        return Ok(None);
    }
    let lookups = client::plan(&table, &cfg.dns);
    if lookups.is_empty() {
        return Ok(None);
    }
    let list = lua.create_table()?;
    for (q, r) in lookups {
        list.push(lookup_entry(lua, &q, &r)?)?;
    }
    Ok(Some(list))
}

/// The table a REST write would leave, for [`plan`]: `args` are the
/// request as writes.lua passes it to the handler.
fn api_planned(
    lua: &Lua,
    cfg: &Config,
    args: &[Value],
    table: &mut UpstreamTable,
) -> LuaResult<bool> {
    let req = super::http::ApiRequest::from_lua_multi(args.iter().skip(1).cloned().collect(), lua)?;
    Ok(match req.planned(cfg, table) {
        Some(t) => {
            *table = t;
            true
        }
        None => false,
    })
}

/// `raw.dns_answers(plan)`: the plan's replies as the answers of a write.
fn answers(_: &Lua, plan: Table) -> LuaResult<AnswersHandle> {
    let cfg = config().map_err(mlua::Error::runtime)?;
    let mut found = std::collections::HashMap::new();
    for entry in plan.sequence_values::<Table>() {
        let entry = entry?;
        found.insert(query_of(&entry)?, lookup_of(&entry)?);
    }
    Ok(AnswersHandle(Answers {
        found,
        at_ms: client::now_ms(),
        default_ipv6: cfg.dns.ipv6,
    }))
}

/// `raw.dns_due()`: in the worker that holds the resolver lease (taking
/// it when it is free), the lookups due now, each with its `id`; nil in
/// the others.
fn due(lua: &Lua, (): ()) -> LuaResult<Option<Table>> {
    let Ok(cfg) = config() else { return Ok(None) };
    let jobs = {
        let guard = WORKER.lock();
        let Some(w) = guard.as_ref() else {
            return Ok(None);
        };
        let store = w.store();
        let me = std::process::id();
        let mut schedule = SCHEDULE.lock();
        if !lease::hold(
            store.resolver_lease(),
            me,
            client::now_ms(),
            crate::store::pid_alive,
        ) {
            // Another worker resolves; what this one knew is stale by now.
            *schedule = None;
            return Ok(None);
        }
        let snap = w.snapshot();
        // A new holder goes on from what the last one published.
        schedule
            .get_or_insert_with(|| Schedule::resuming(name_status::read(&cfg.path)))
            .due(&snap.table, snap.seen, &cfg.dns, client::now_ms())
    };
    if jobs.is_empty() {
        return Ok(None);
    }
    let list = lua.create_table()?;
    for j in jobs {
        let e = lookup_entry(lua, &j.query, &j.resolver)?;
        e.set("id", j.id)?;
        list.push(e)?;
    }
    Ok(Some(list))
}

/// `raw.dns_record(entry)`: takes the replies to a due lookup; returns the
/// write it asks for, or nil. Publishes what is known of every line
/// (`PATH.dns`) and logs a line's failure once, and its recovery.
fn record(lua: &Lua, entry: Table) -> LuaResult<Option<UpdateHandle>> {
    let id: u64 = entry.get("id")?;
    let lookup = lookup_of(&entry)?;
    let Ok(cfg) = config() else { return Ok(None) };
    let Some(table) = current_table() else {
        return Ok(None);
    };
    let mut guard = SCHEDULE.lock();
    let Some(schedule) = guard.as_mut() else {
        return Ok(None);
    };
    let update = schedule.record(id, lookup, &table, client::now_ms());
    let statuses = schedule.statuses();
    drop(guard);
    if let Err(e) = name_status::write(&cfg.path, &statuses) {
        log(lua, "WARN", &e);
    }
    let mut logged = LOGGED.lock();
    for s in &statuses {
        let at = logged
            .iter()
            .position(|(u, n, _)| *u == s.upstream && *n == s.server);
        let before = at.and_then(|i| logged[i].2.clone());
        if before == s.error {
            continue;
        }
        match &s.error {
            Some(e) => log(
                lua,
                "WARN",
                &format!("upstream {}: server {} resolve: {e}", s.upstream, s.server),
            ),
            None if before.is_some() => log(
                lua,
                "NOTICE",
                &format!(
                    "upstream {}: server {} resolves again: {}",
                    s.upstream,
                    s.server,
                    s.addresses.join(" ")
                ),
            ),
            None => {}
        }
        let row = (s.upstream.clone(), s.server.clone(), s.error.clone());
        match at {
            Some(i) => logged[i] = row,
            None => logged.push(row),
        }
    }
    Ok(update.map(UpdateHandle))
}

/// `raw.dns_apply(turn, update)`: writes an answer's addresses into the
/// table, as one write (staying addresses keep their cells), and logs
/// what changed; a server kept as its upstream's last is logged too.
fn apply(lua: &Lua, (mut turn, update): (Turn, AnyUserData)) -> LuaResult<()> {
    let u = update.borrow::<UpdateHandle>()?.0.clone();
    let r = super::write_api::write(lua, &mut turn, None, |t| {
        Ok(apply_lookup(
            t,
            &u.upstream,
            &u.line,
            &u.lookup,
            u.ttl,
            client::now_ms(),
        ))
    });
    let shown: Vec<String> = match &u.lookup {
        Lookup::Found { addrs, .. } => addrs.iter().map(ToString::to_string).collect(),
        Lookup::Service { endpoints, .. } => endpoints
            .iter()
            .map(|e| format!("{} (priority {}, weight {})", e.addr, e.priority, e.weight))
            .collect(),
        Lookup::NotFound(_) | Lookup::Failed(_) => Vec::new(),
    };
    match r {
        Ok((v, Applied::Changed)) => log(
            lua,
            "NOTICE",
            &format!(
                "upstream {}: server {} resolve: now {} (table version {v})",
                u.upstream,
                u.line.target(),
                if shown.is_empty() {
                    "no address: NXDOMAIN".into()
                } else {
                    shown.join(" ")
                }
            ),
        ),
        Ok((_, Applied::KeptLast(kept))) => log(
            lua,
            "WARN",
            &format!(
                "upstream {}: server {} resolve: NXDOMAIN, but kept {}: the last available \
                 server of the upstream",
                u.upstream,
                u.line.target(),
                kept.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ),
        Ok(_) => {}
        Err(e) => log(
            lua,
            "ERR",
            &format!(
                "upstream {}: server {} resolve: could not write the new addresses: {e}; \
                 asked again at the next lookup",
                u.upstream,
                u.line.target()
            ),
        ),
    }
    Ok(())
}

/// `dyups.get(name).names`: each `server NAME` line, as written, with the
/// addresses the table holds for it.
pub(super) fn names_table(lua: &Lua, u: &Upstream) -> LuaResult<Table> {
    let out = lua.create_table()?;
    for (i, n) in u.names.iter().enumerate() {
        let t = lua.create_table()?;
        t.set("server", n.target())?;
        t.set("line", crate::table::syntax::render_named(n))?;
        t.set("resolve", n.resolve)?;
        t.set("service", n.service.as_deref())?;
        t.set("resolved", n.resolved_ms)?;
        t.set("ttl", n.ttl)?;
        let addrs: Vec<String> = u
            .servers
            .iter()
            .filter(|s| s.from == Some(i as u16))
            .map(|s| s.addr.to_string())
            .collect();
        t.set("addresses", lua.create_sequence_from(addrs)?)?;
        out.push(t)?;
    }
    Ok(out)
}
