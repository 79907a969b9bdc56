//! The module rules of `src/lib.rs` ([`r1_runtime::MODULE_RULES`]) hold for every file under
//! src/: each `crate::` path, in `use` declarations and in code, and each `super::` path that
//! leaves its module, names only modules its own module may use. Paths are resolved through
//! `use` declarations (`crate::cuda::Device` is `cuda::device`'s); comments and string literals
//! are not code. The binaries in src/bin use the library's public API and are not checked.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use r1_runtime::MODULE_RULES;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of Rust source that matter for paths, with their lines; comments, string,
/// byte-string and character literals are dropped.
fn tokenize(src: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    // Skips a string body from just after its opening quote; `hashes` closes a raw string.
    let skip_str = |i: &mut usize, line: &mut usize, raw: bool, hashes: usize| {
        while *i < c.len() {
            match c[*i] {
                '\\' if !raw => *i += 2,
                '"' if c[*i + 1..]
                    .iter()
                    .take(hashes)
                    .filter(|&&h| h == '#')
                    .count()
                    == hashes =>
                {
                    *i += 1 + hashes;
                    return;
                }
                ch => {
                    if ch == '\n' {
                        *line += 1;
                    }
                    *i += 1;
                }
            }
        }
    };
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied().unwrap_or('\0');
        match ch {
            '\n' => {
                line += 1;
                i += 1;
            }
            '/' if next == '/' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == '*' => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if c[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
            }
            '"' => {
                i += 1;
                skip_str(&mut i, &mut line, false, 0);
            }
            '\'' => {
                if next == '\\' {
                    // An escaped character literal: the escape, then up to the closing quote.
                    i += 3;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 3;
                } else {
                    // A lifetime or label: its name is not a path.
                    i += 1;
                    while i < c.len() && ident_char(c[i]) {
                        i += 1;
                    }
                }
            }
            _ if ident_start(ch) => {
                // Raw and byte strings: r"..", r#".."#, b"..", br#".."#.
                let mut j = i;
                if c[j] == 'b' {
                    j += 1;
                }
                let raw = c.get(j) == Some(&'r');
                if raw {
                    j += 1;
                }
                let hashes = c[j..].iter().take_while(|&&h| h == '#').count();
                if (raw || j > i) && c.get(j + hashes) == Some(&'"') && (raw || hashes == 0) {
                    i = j + hashes + 1;
                    skip_str(&mut i, &mut line, raw, hashes);
                    continue;
                }
                if c[i] == 'b' && next == '\'' {
                    // A byte literal: b'x' or b'\n'.
                    i += 2;
                    if c.get(i) == Some(&'\\') {
                        i += 1;
                    }
                    i += 2;
                    continue;
                }
                let start = i;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
                out.push((Tok::Ident(c[start..i].iter().collect()), line));
            }
            _ if ch.is_ascii_digit() => {
                while i < c.len() && (ident_char(c[i]) || c[i] == '.') {
                    i += 1;
                }
            }
            ':' if next == ':' => {
                out.push((Tok::PathSep, line));
                i += 2;
            }
            _ if ch.is_whitespace() => i += 1,
            _ => {
                out.push((Tok::Punct(ch), line));
                i += 1;
            }
        }
    }
    out
}

/// One path as written: its segments (`*` for a glob), its line, the name it is bound to in
/// a `use` declaration, and whether it is part of one.
#[derive(Debug, Clone)]
struct RawPath {
    segs: Vec<String>,
    line: usize,
    alias: Option<String>,
    in_use: bool,
    /// The module (inline `mod` blocks included) the path is written in.
    scope: Vec<String>,
}

/// Reads a path or use tree starting at `toks[*i]` (an identifier or `{`) below `prefix`.
fn read_tree(
    toks: &[(Tok, usize)],
    i: &mut usize,
    prefix: &[String],
    in_use: bool,
    scope: &[String],
    out: &mut Vec<RawPath>,
) {
    let mut segs = prefix.to_vec();
    let line = toks.get(*i).map_or(0, |t| t.1);
    loop {
        match toks.get(*i).map(|t| &t.0) {
            Some(Tok::Ident(s)) => {
                segs.push(s.clone());
                *i += 1;
            }
            Some(Tok::Punct('*')) => {
                segs.push("*".into());
                *i += 1;
                break;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                while let Some((t, _)) = toks.get(*i) {
                    match t {
                        Tok::Punct('}') => {
                            *i += 1;
                            break;
                        }
                        Tok::Punct(',') => *i += 1,
                        _ => {
                            let before = *i;
                            read_tree(toks, i, &segs, in_use, scope, out);
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
                return;
            }
            _ => break,
        }
        if toks.get(*i).map(|t| &t.0) == Some(&Tok::PathSep) {
            *i += 1;
        } else {
            break;
        }
    }
    // `use a::b::{self}` binds `b`.
    if segs.last().map(String::as_str) == Some("self") && segs.len() > prefix.len() {
        segs.pop();
    }
    let mut alias = None;
    if let Some(Tok::Ident(a)) = toks.get(*i).map(|t| &t.0) {
        if a == "as" {
            if let Some(Tok::Ident(name)) = toks.get(*i + 1).map(|t| &t.0) {
                alias = Some(name.clone());
                *i += 2;
            }
        }
    }
    if segs.len() > prefix.len() || !prefix.is_empty() {
        out.push(RawPath {
            segs,
            line,
            alias,
            in_use,
            scope: scope.to_vec(),
        });
    }
}

/// Every path of a file: all `use` trees, and in code every path that starts at `crate`,
/// `super` or `self` (not `$crate`).
fn paths(src: &str, module: &[String]) -> Vec<RawPath> {
    let toks = tokenize(src);
    let mut out = Vec::new();
    let mut depth = 0usize;
    // Inline modules: (name, brace depth inside them).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let scope = |inline: &[(String, usize)]| {
        let mut s = module.to_vec();
        s.extend(inline.iter().map(|(n, _)| n.clone()));
        s
    };
    let mut i = 0;
    while i < toks.len() {
        let prev = i.checked_sub(1).map(|p| &toks[p].0);
        match &toks[i].0 {
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(k) if k == "mod" => {
                if let (Some((Tok::Ident(name), _)), Some((Tok::Punct('{'), _))) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth + 1));
                }
                i += 1;
            }
            Tok::Ident(k) if k == "use" => {
                i += 1;
                if toks.get(i).map(|t| &t.0) == Some(&Tok::PathSep) {
                    i += 1; // `use ::std::..`: an external crate
                }
                let sc = scope(&inline);
                read_tree(&toks, &mut i, &[], true, &sc, &mut out);
            }
            Tok::Ident(k)
                if matches!(k.as_str(), "crate" | "super" | "self")
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep)
                    && !matches!(prev, Some(Tok::PathSep) | Some(Tok::Punct('$'))) =>
            {
                let sc = scope(&inline);
                read_tree(&toks, &mut i, &[], false, &sc, &mut out);
            }
            _ => i += 1,
        }
    }
    out
}

/// A path made absolute (segments from the crate root), or None for external crates and
/// names that are not modules of this crate.
fn absolute(p: &RawPath, modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut segs = p.segs.iter().peekable();
    let mut base: Vec<String> = match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
            Vec::new()
        }
        Some("self") => {
            segs.next();
            p.scope.clone()
        }
        Some("super") => {
            let mut b = p.scope.clone();
            while segs.peek().map(|s| s.as_str()) == Some("super") {
                segs.next();
                b.pop()?;
            }
            b
        }
        // A relative `use`: a child module of the scope, else an external crate.
        Some(first) => {
            let mut child = p.scope.clone();
            child.push(first.to_string());
            if !modules.contains(&child) {
                return None;
            }
            p.scope.clone()
        }
        None => return None,
    };
    base.extend(segs.cloned());
    Some(base)
}

/// Follows `use` bindings: `cuda::Device` is `cuda::device::Device` where cuda/mod.rs has
/// `pub use device::Device`.
fn resolve(
    mut path: Vec<String>,
    modules: &BTreeSet<Vec<String>>,
    bindings: &HashMap<Vec<String>, HashMap<String, Vec<String>>>,
) -> Vec<String> {
    for _ in 0..16 {
        let hop = (0..path.len()).find_map(|k| {
            let (module, rest) = path.split_at(k);
            let name = rest.first()?;
            let mut child = module.to_vec();
            child.push(name.clone());
            if modules.contains(&child) {
                return None;
            }
            let target = bindings.get(module)?.get(name)?;
            let mut p = target.clone();
            p.extend(rest[1..].iter().cloned());
            Some(p)
        });
        match hop {
            Some(p) if p != path => path = p,
            _ => break,
        }
    }
    path
}

/// `a::b::c` as segments.
fn segs(name: &str) -> Vec<String> {
    name.split("::").map(String::from).collect()
}

/// The module a source file defines: src/a/b.rs and src/a/b/mod.rs are `a::b`, src/lib.rs is
/// the crate root (no segments); None for files outside the library (src/bin).
fn module_of(file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix("src").ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().map(String::as_str) == Some("bin") {
        return None;
    }
    let last = parts.pop()?;
    match last.strip_suffix(".rs")? {
        "lib" if parts.is_empty() => {}
        "mod" => {}
        stem => parts.push(stem.to_string()),
    }
    Some(parts)
}

/// A path that breaks the rules (or a module without one), where it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    file: String,
    line: usize,
    message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Checks `files` (path relative to the crate root, source) against `rules`.
fn check(files: &[(PathBuf, String)], rules: &[(&str, &[&str])]) -> Vec<Violation> {
    let units: Vec<Vec<String>> = rules.iter().map(|(m, _)| segs(m)).collect();
    let direct: HashMap<&str, &[&str]> = rules.iter().copied().collect();
    // Everything a unit may use: what it lists and, through those, what they may use.
    let closure = |unit: &str| -> Vec<Vec<String>> {
        let mut seen: Vec<&str> = Vec::new();
        let mut stack: Vec<&str> = direct.get(unit).copied().unwrap_or(&[]).to_vec();
        while let Some(u) = stack.pop() {
            if !seen.contains(&u) {
                seen.push(u);
                stack.extend(direct.get(u).copied().unwrap_or(&[]));
            }
        }
        seen.into_iter().map(segs).collect()
    };
    let known: BTreeSet<Vec<String>> = rules
        .iter()
        .flat_map(|(m, uses)| std::iter::once(*m).chain(uses.iter().copied()))
        .map(segs)
        .collect();
    let name_of = |path: &[String]| -> String {
        known
            .iter()
            .filter(|k| path.starts_with(k))
            .max_by_key(|k| k.len())
            .map_or_else(
                || path.first().cloned().unwrap_or_default(),
                |k| k.join("::"),
            )
    };

    // Per file: its path, its module (None outside the library) and its paths.
    type Parsed<'a> = (&'a PathBuf, Option<Vec<String>>, Vec<RawPath>);
    let parsed: Vec<Parsed> = files
        .iter()
        .map(|(file, src)| {
            let module = module_of(file);
            let ps = module.as_ref().map_or_else(Vec::new, |m| paths(src, m));
            (file, module, ps)
        })
        .collect();
    let mut modules: BTreeSet<Vec<String>> = parsed.iter().filter_map(|p| p.1.clone()).collect();
    for (_, _, ps) in &parsed {
        modules.extend(ps.iter().map(|p| p.scope.clone()));
    }
    // What every `use` binds, by module.
    let mut bindings: HashMap<Vec<String>, HashMap<String, Vec<String>>> = HashMap::new();
    for (_, _, ps) in &parsed {
        for p in ps.iter().filter(|p| p.in_use) {
            let Some(target) = absolute(p, &modules) else {
                continue;
            };
            let Some(name) = p.alias.clone().or_else(|| target.last().cloned()) else {
                continue;
            };
            if name != "*" && name != "_" {
                bindings
                    .entry(p.scope.clone())
                    .or_default()
                    .insert(name, target);
            }
        }
    }

    let mut out = Vec::new();
    for (file, module, ps) in &parsed {
        // The crate root declares the modules and holds the rules; src/bin is not the library.
        let Some(module) = module.as_ref().filter(|m| !m.is_empty()) else {
            continue;
        };
        let file = file.display().to_string();
        let Some(unit) = units
            .iter()
            .filter(|u| module.starts_with(u))
            .max_by_key(|u| u.len())
        else {
            out.push(Violation {
                file,
                line: 1,
                message: format!("module {} has no rule", module.join("::")),
            });
            continue;
        };
        let allowed = closure(&unit.join("::"));
        for p in ps {
            if !matches!(p.segs[0].as_str(), "crate" | "super") {
                continue;
            }
            let Some(abs) = absolute(p, &modules) else {
                continue;
            };
            let target = resolve(abs, &modules, &bindings);
            let ok = target.starts_with(unit) || allowed.iter().any(|a| target.starts_with(a));
            if !ok {
                out.push(Violation {
                    file: file.clone(),
                    line: p.line,
                    message: format!(
                        "{} -> {} (crate::{})",
                        unit.join("::"),
                        name_of(&target),
                        target.join("::")
                    ),
                });
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("readable source folder")
        .map(|e| e.expect("readable entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn sources_follow_the_module_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    rust_files(&root.join("src"), &mut found);
    let files: Vec<(PathBuf, String)> = found
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(root).expect("under the crate").to_path_buf();
            (rel, std::fs::read_to_string(p).expect("readable source"))
        })
        .collect();
    assert!(
        files.len() > 50,
        "found the sources ({} files)",
        files.len()
    );
    let violations = check(&files, MODULE_RULES);
    let report: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
    assert!(
        violations.is_empty(),
        "{} paths break the module rules of src/lib.rs:\n{}",
        violations.len(),
        report.join("\n")
    );
}

/// The rules name each module once, and every module they allow exists as a rule or as a
/// module below one.
#[test]
fn the_rules_are_well_formed() {
    let names: Vec<&str> = MODULE_RULES.iter().map(|(m, _)| *m).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "a module listed twice");
    for (m, uses) in MODULE_RULES {
        for u in *uses {
            assert_ne!(m, u, "{m} lists itself");
            assert!(
                names
                    .iter()
                    .any(|n| u == n || u.starts_with(&format!("{n}::"))),
                "{m} may use {u}, which no rule covers"
            );
        }
    }
}

#[test]
fn the_checker_finds_forbidden_paths() {
    let rules: &[(&str, &[&str])] = &[
        ("error", &[]),
        ("low", &["error"]),
        ("mid", &["low"]),
        ("side", &["low"]),
        ("dev", &["mid"]),
        ("dev::ops", &["dev::core", "low"]),
        ("top", &["mid", "side", "dev"]),
    ];
    let file = |path: &str, src: &str| (PathBuf::from(path), src.to_string());
    let files =
        vec![
        file("src/lib.rs", "pub mod low;\npub use low::Thing;\n"),
        file(
            "src/low.rs",
            "//! Uses [`crate::top`] in a doc comment only.\n\
             use crate::error::Result;\n\
             const S: &str = \"crate::top::x\";\n\
             const R: &str = r#\"crate::mid::\"x\"#;\n\
             /* crate::top::y /* nested */ crate::top::z */\n\
             fn f<'a>(c: char) -> bool { c == '\"' || c == '\\'' }\n\
             pub struct Thing;\n",
        ),
        file(
            "src/mid.rs",
            "use crate::{low::Thing, top::Up};\n\
             fn g() { crate::side::h(); }\n\
             fn k() -> crate::Thing { todo!() }\n\
             #[cfg(test)]\nmod tests { use super::*; use super::super::top; }\n",
        ),
        file("src/side.rs", "use super::mid;\nmacro_rules! m { () => { $crate::top::x() } }\n"),
        file(
            "src/dev/mod.rs",
            "mod core;\nmod ops;\nmod glue;\npub use core::Buffer;\npub use glue::Glue;\n",
        ),
        file("src/dev/core.rs", "pub struct Buffer;\n"),
        file("src/dev/glue.rs", "use crate::mid::Model;\npub struct Glue;\n"),
        file(
            "src/dev/ops/mod.rs",
            "use super::Buffer;\nuse super::core::Buffer as B;\nuse crate::dev::{Glue, core};\n\
             use super::super::mid::Model;\nuse crate::low::Thing;\nmod k;\n",
        ),
        file("src/dev/ops/k.rs", "use super::super::super::side::S;\nuse super::B;\n"),
        file("src/top.rs", "use crate::dev::ops;\nuse crate::side;\n"),
        file("src/stray.rs", "use crate::low;\n"),
        file("src/bin/tool.rs", "use crate::anything;\n"),
    ];
    let got: Vec<String> = check(&files, rules).iter().map(|v| v.to_string()).collect();
    assert_eq!(
        got,
        vec![
            "src/mid.rs:1: mid -> top (crate::top::Up)",
            "src/mid.rs:2: mid -> side (crate::side::h)",
            "src/mid.rs:5: mid -> top (crate::top)",
            "src/side.rs:1: side -> mid (crate::mid)",
            "src/dev/ops/mod.rs:3: dev::ops -> dev (crate::dev::glue::Glue)",
            "src/dev/ops/mod.rs:4: dev::ops -> mid (crate::mid::Model)",
            "src/dev/ops/k.rs:1: dev::ops -> side (crate::side::S)",
            "src/stray.rs:1: module stray has no rule",
        ]
    );
}
