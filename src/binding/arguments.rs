//! Checking a Lua caller's arguments. A wrong one is a programmer's
//! mistake, so it raises, in Lua's own words: `bad argument #1 to 'update'
//! (string expected, got nil)`.

use mlua::Value;

use super::LuaResult;

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Integer(_) | Value::Number(_) => "number",
        v => v.type_name(),
    }
}

pub(super) fn bad_argument(n: usize, f: &str, want: &str, got: &Value) -> mlua::Error {
    mlua::Error::runtime(format!(
        "bad argument #{n} to '{f}' ({want} expected, got {})",
        type_name(got)
    ))
}

fn nil() -> Value {
    Value::Nil
}

/// Argument `n` (1-based) as a string; a number is not a string here.
pub(super) fn string_arg(args: &[Value], n: usize, f: &str) -> LuaResult<String> {
    match args.get(n - 1) {
        Some(Value::String(s)) => Ok(String::from_utf8_lossy(&s.as_bytes()).into_owned()),
        other => Err(bad_argument(n, f, "string", other.unwrap_or(&nil()))),
    }
}

pub(super) fn opt_string_arg(args: &[Value], n: usize, f: &str) -> LuaResult<Option<String>> {
    match args.get(n - 1) {
        None | Some(Value::Nil) => Ok(None),
        _ => string_arg(args, n, f).map(Some),
    }
}

/// The optional expected table version of a write.
pub(super) fn expect_arg(args: &[Value], n: usize, f: &str) -> LuaResult<Option<u64>> {
    match args.get(n - 1) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
        Some(Value::Number(x)) if *x >= 0.0 && x.fract() == 0.0 => Ok(Some(*x as u64)),
        Some(v) => Err(bad_argument(n, f, "version number", v)),
    }
}
