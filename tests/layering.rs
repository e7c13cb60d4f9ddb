//! Keeps the tree's layering true: each folder of `src/` may use only the
//! folders below it in `LAYERS` (and its own files, and the crate root's
//! `error`), a source file over 600 lines says why at its top, and the
//! README's map in its Development section names every folder and file.
//!
//! Test code is exempt from the order: a `tests.rs`, `testing.rs` and the
//! `mod tests { ... }` a file ends with may build fixtures from any folder.

use std::fs;
use std::path::{Path, PathBuf};

/// From the bottom up; a folder may use the ones before it.
const LAYERS: [&str; 7] = [
    "table", "store", "health", "balance", "admin", "dns", "binding",
];
/// Crate-root modules every folder may use.
const SHARED: [&str; 3] = ["error", "Error", "Result"];
/// Longest file that need not say why it is one file.
const LINES_MAX: usize = 600;
/// What a longer file's module doc says.
const WHY: &str = "Over 600 lines";

fn layer(name: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == name)
}

/// The text of `src` that is not test code, without `//` comments.
fn code_of(src: &str) -> String {
    let end = src.find("\n#[cfg(test)]\nmod tests {").unwrap_or(src.len());
    src[..end]
        .lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate-root names `code` uses: `crate::NAME` and `crate::{A, B}`.
fn uses_of(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = item.trim().split("::").next().unwrap_or("").trim();
                if !name.is_empty() {
                    names.push(name.to_string());
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names
}

/// What is wrong with file `rel` (relative to `src/`) of text `src`.
fn violations(rel: &str, src: &str) -> Vec<String> {
    let parts: Vec<&str> = rel.split('/').collect();
    let file = parts[parts.len() - 1];
    let mut out = Vec::new();
    if src.lines().count() > LINES_MAX {
        let doc: String = src.lines().take_while(|l| l.starts_with("//!")).collect();
        if !doc.contains(WHY) {
            out.push(format!(
                "{rel}: {} lines; split it, or say why in its module doc (\"{WHY}: ...\")",
                src.lines().count()
            ));
        }
    }
    if parts.len() == 1 || file == "tests.rs" {
        return out; // the crate root, or test code
    }
    let Some(own) = layer(parts[0]) else {
        out.push(format!(
            "{rel}: folder {:?} is not in LAYERS (tests/layering.rs)",
            parts[0]
        ));
        return out;
    };
    for name in uses_of(&code_of(src)) {
        if SHARED.contains(&name.as_str()) {
            continue;
        }
        match layer(&name) {
            Some(l) if l <= own => {}
            Some(_) => out.push(format!("{rel}: uses crate::{name}, a folder above it")),
            None => out.push(format!("{rel}: uses crate::{name}, which is in no layer")),
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn folders_use_only_the_folders_below_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    let mut seen = Vec::new();
    let mut wrong = Vec::new();
    for path in &files {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // testing.rs is test-only; src/bin/ holds programs outside the
        // module tree, which use the library's public API like any user.
        if rel == "testing.rs" || rel.starts_with("bin/") {
            continue;
        }
        wrong.extend(violations(&rel, &fs::read_to_string(path).unwrap()));
        seen.push(rel);
    }
    // The walk found the tree it checks.
    for f in [
        "table/model.rs",
        "store/mod.rs",
        "health/mod.rs",
        "balance/worker.rs",
        "admin/rest.rs",
    ] {
        assert!(seen.iter().any(|s| s == f), "{f} not found under src/");
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_catches_what_it_forbids() {
    // An arrow upward, single and grouped, is caught; one downward and one
    // in a comment or a test module are not.
    let up = "use crate::balance::worker::Worker;\n";
    assert_eq!(violations("store/mod.rs", up).len(), 1);
    assert_eq!(
        violations("table/model.rs", "use crate::{admin, error};\n").len(),
        1
    );
    assert!(violations("admin/ops.rs", up).is_empty());
    assert!(violations("table/x.rs", "// see crate::store\nuse crate::Error;\n").is_empty());
    let tail = "fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::admin::ops;\n}\n";
    assert!(violations("store/zone.rs", tail).is_empty());
    assert_eq!(violations("metrics/count.rs", "").len(), 1);
    // health sits between store and balance.
    assert!(violations("health/mod.rs", "use crate::store::zone::Zone;\n").is_empty());
    assert_eq!(violations("health/mod.rs", up).len(), 1);
    assert!(violations("balance/worker.rs", "use crate::health::Verdict;\n").is_empty());
    // A long file must say why.
    let long = "fn f() {}\n".repeat(LINES_MAX + 1);
    assert_eq!(violations("store/codec.rs", &long).len(), 1);
    let why = format!("//! {WHY}: one concept.\n{long}");
    assert!(violations("store/codec.rs", &why).is_empty());
}

#[test]
fn the_readme_map_names_every_folder_and_file() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(manifest.join("README.md")).unwrap();
    let map = &readme[readme
        .find("## Development")
        .expect("a Development section")..];
    let root = manifest.join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut missing = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&root).unwrap();
        let name = rel.file_name().unwrap().to_string_lossy();
        // A program in src/bin/ is named by its folder (below).
        if ["lib.rs", "mod.rs", "tests.rs"].contains(&name.as_ref()) || rel.starts_with("bin") {
            continue;
        }
        if !map.contains(&format!("`{name}`")) && !map.contains(&format!("/{name}`")) {
            missing.push(rel.display().to_string());
        }
    }
    let programs = fs::read_dir(root.join("bin")).into_iter().flatten();
    for program in programs {
        let name = program.unwrap().file_name().to_string_lossy().into_owned();
        if !map.contains(&format!("`bin/{name}/`")) {
            missing.push(format!("bin/{name}/"));
        }
    }
    for folder in LAYERS {
        if !map.contains(&format!("`{folder}/`")) {
            missing.push(format!("{folder}/"));
        }
    }
    assert!(missing.is_empty(), "README's map lacks: {missing:?}");
}
