//! Writing the table back in nginx syntax: `server` lines, `upstream {}`
//! blocks and the upstream file, printing only what differs from nginx's
//! defaults.

use crate::table::model::{
    CheckLine, CheckType, ExpectAlive, ServerSpec, Table, Upstream, DEFAULT_CHECK_HTTP_SEND,
    DEFAULT_CHECK_KEEPALIVE_REQUESTS, DEFAULT_FAIL_TIMEOUT, DEFAULT_KEEPALIVE_REQUESTS,
    DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_FAILS, DEFAULT_WEIGHT,
};
use crate::table::names::{NamedServer, ServerParams};
use crate::table::policy::Policy;

/// The header `render_upstream_file` writes.
const FILE_HEADER: &str = "# written by ngx.dyups; edits are overwritten\n";

/// `server ADDR [PARAMS];`, with only the parameters that differ from nginx's
/// defaults.
pub fn render_server(s: &ServerSpec) -> String {
    let mut out = format!("server {}", s.addr);
    render_params(&mut out, &ServerParams::of(s));
    out.push(';');
    out
}

/// `server NAME[:PORT] [PARAMS] [service=NAME] [resolve];`: the line as written, its
/// parameters as [`render_server`] prints them.
pub fn render_named(n: &NamedServer) -> String {
    let mut out = format!("server {}", n.target());
    render_params(&mut out, &n.params);
    if let Some(service) = &n.service {
        out.push_str(&format!(" service={service}"));
    }
    if n.resolve {
        out.push_str(" resolve");
    }
    out.push(';');
    out
}

fn render_params(out: &mut String, p: &ServerParams) {
    if p.weight != DEFAULT_WEIGHT {
        out.push_str(&format!(" weight={}", p.weight));
    }
    if p.max_conns != 0 {
        out.push_str(&format!(" max_conns={}", p.max_conns));
    }
    if p.max_fails != DEFAULT_MAX_FAILS {
        out.push_str(&format!(" max_fails={}", p.max_fails));
    }
    if p.fail_timeout != DEFAULT_FAIL_TIMEOUT {
        out.push_str(&format!(" fail_timeout={}s", p.fail_timeout));
    }
    if p.slow_start != 0 {
        out.push_str(&format!(" slow_start={}s", p.slow_start));
    }
    if p.backup {
        out.push_str(" backup");
    }
    if p.down {
        out.push_str(" down");
    }
}

/// The `server` lines of an upstream as written: each server at an
/// address, and each `server NAME` line once, where its first address
/// stands (after the others when it has none now), instead of the
/// addresses it resolved to.
pub fn server_lines(u: &Upstream) -> Vec<String> {
    let mut shown = vec![false; u.names.len()];
    let mut lines = Vec::with_capacity(u.servers.len());
    for s in &u.servers {
        match s.from.map(usize::from) {
            None => lines.push(render_server(s)),
            Some(i) if i < shown.len() && !shown[i] => {
                shown[i] = true;
                lines.push(render_named(&u.names[i]));
            }
            Some(_) => {}
        }
    }
    for (n, shown) in u.names.iter().zip(shown) {
        if !shown {
            lines.push(render_named(n));
        }
    }
    lines
}

/// `upstream NAME {` with its setting lines, then one indented `server`
/// line per server, then `}`.
pub fn render_upstream(u: &Upstream) -> String {
    let mut out = format!("upstream {} {{\n", u.name);
    for line in setting_lines(u).into_iter().chain(server_lines(u)) {
        out.push_str("    ");
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("}\n");
    out
}

/// The lines of an upstream besides its servers, each with its `;`: the
/// balancing method, the keepalive lines and the check lines, each only
/// when it differs from nginx's (or the check module's) default. Every
/// string in them is quoted so that it reads back as it is: none can end a
/// line or a statement early.
pub fn setting_lines(u: &Upstream) -> Vec<String> {
    let mut lines = Vec::new();
    if u.policy != Policy::RoundRobin {
        lines.push(u.policy.to_string());
    }
    if u.keepalive > 0 {
        lines.push(format!("keepalive {};", u.keepalive));
    }
    if u.keepalive_requests != DEFAULT_KEEPALIVE_REQUESTS {
        lines.push(format!("keepalive_requests {};", u.keepalive_requests));
    }
    if u.keepalive_time != DEFAULT_KEEPALIVE_TIME {
        lines.push(format!(
            "keepalive_time {};",
            nginx_millis(u.keepalive_time)
        ));
    }
    if u.keepalive_timeout != DEFAULT_KEEPALIVE_TIMEOUT {
        lines.push(format!(
            "keepalive_timeout {};",
            nginx_millis(u.keepalive_timeout)
        ));
    }
    let d = &u.dns;
    if !d.resolvers.is_empty() || d.valid.is_some() || d.ipv6.is_some() {
        let mut line = String::from("resolver");
        for a in &d.resolvers {
            line.push_str(&format!(" {a}"));
        }
        if let Some(v) = d.valid {
            line.push_str(&format!(" valid={v}s"));
        }
        if let Some(on) = d.ipv6 {
            line.push_str(if on { " ipv6=on" } else { " ipv6=off" });
        }
        lines.push(line + ";");
    }
    if let Some(ms) = d.timeout_ms {
        lines.push(format!("resolver_timeout {};", nginx_millis(ms)));
    }
    let c = &u.check;
    if let Some(line) = &c.line {
        lines.push(render_check_line(line));
    }
    if c.http_send != DEFAULT_CHECK_HTTP_SEND {
        lines.push(format!("check_http_send {};", quoted(&c.http_send)));
    }
    if c.http_expect_alive != ExpectAlive::default() {
        let names: Vec<&str> = c.http_expect_alive.names().collect();
        lines.push(format!("check_http_expect_alive {};", names.join(" ")));
    }
    if c.keepalive_requests != DEFAULT_CHECK_KEEPALIVE_REQUESTS {
        lines.push(format!(
            "check_keepalive_requests {};",
            c.keepalive_requests
        ));
    }
    lines
}

/// `check interval=... rise=... fall=... timeout=...;` (times in bare
/// milliseconds, as the module writes them), then what differs from the
/// module's defaults.
pub fn render_check_line(c: &CheckLine) -> String {
    let mut out = format!(
        "check interval={} rise={} fall={} timeout={}",
        c.interval, c.rise, c.fall, c.timeout
    );
    if !c.default_down {
        out.push_str(" default_down=false");
    }
    if c.kind != CheckType::Tcp {
        out.push_str(&format!(" type={}", c.kind.name()));
    }
    if c.port != 0 {
        out.push_str(&format!(" port={}", c.port));
    }
    if c.jitter != 0 {
        out.push_str(&format!(" jitter={}", c.jitter));
    }
    out.push(';');
    out
}

/// Milliseconds in nginx's time syntax: whole seconds as `60s`, else `ms`.
fn nginx_millis(ms: u32) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `s` as an nginx quoted string that the tokenizer reads back as `s`:
/// quotes and backslashes escaped, tab, CR and LF as `\t`, `\r`, `\n`.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Every upstream block, after a header comment, separated by blank lines.
pub fn render_upstream_file(t: &Table) -> String {
    let blocks: Vec<String> = t.upstreams.iter().map(|u| render_upstream(u)).collect();
    let mut out = String::from(FILE_HEADER);
    if !blocks.is_empty() {
        out.push('\n');
        out.push_str(&blocks.join("\n"));
    }
    out
}
