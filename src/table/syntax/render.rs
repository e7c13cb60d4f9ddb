//! Writing the table back in nginx syntax: `server` lines, `upstream {}`
//! blocks and the upstream file, printing only what differs from nginx's
//! defaults.

use crate::table::model::{
    CheckLine, CheckType, ExpectAlive, ServerSpec, Table, Upstream, DEFAULT_CHECK_HTTP_SEND,
    DEFAULT_CHECK_KEEPALIVE_REQUESTS, DEFAULT_FAIL_TIMEOUT, DEFAULT_KEEPALIVE_REQUESTS,
    DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_FAILS, DEFAULT_WEIGHT,
};
use crate::table::policy::Policy;

/// The header `render_upstream_file` writes.
const FILE_HEADER: &str = "# written by ngx.dyups; edits are overwritten\n";

/// `server ADDR [PARAMS];`, with only the parameters that differ from nginx's
/// defaults.
pub fn render_server(s: &ServerSpec) -> String {
    let mut out = format!("server {}", s.addr);
    if s.weight != DEFAULT_WEIGHT {
        out.push_str(&format!(" weight={}", s.weight));
    }
    if s.max_conns != 0 {
        out.push_str(&format!(" max_conns={}", s.max_conns));
    }
    if s.max_fails != DEFAULT_MAX_FAILS {
        out.push_str(&format!(" max_fails={}", s.max_fails));
    }
    if s.fail_timeout != DEFAULT_FAIL_TIMEOUT {
        out.push_str(&format!(" fail_timeout={}s", s.fail_timeout));
    }
    if s.slow_start != 0 {
        out.push_str(&format!(" slow_start={}s", s.slow_start));
    }
    if s.backup {
        out.push_str(" backup");
    }
    if s.down {
        out.push_str(" down");
    }
    out.push(';');
    out
}

/// `upstream NAME {` with its setting lines, then one indented `server`
/// line per server, then `}`.
pub fn render_upstream(u: &Upstream) -> String {
    let mut out = format!("upstream {} {{\n", u.name);
    let servers = u.servers.iter().map(render_server);
    for line in setting_lines(u).into_iter().chain(servers) {
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
