//! The layers of `src/` point one way: no file imports, directly or through others, a file
//! that imports it back. Read from the source text: every `crate::a::b` or `super::…` path
//! (outside `#[cfg(test)]` modules) is an arrow to the deepest module file it names; a path
//! naming a folder module (`crate::config::X`) is an arrow to its `mod.rs`. That is stricter
//! than following each name to where it is defined, so a circle through a re-export counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/` with its module path (`["proxy", "connect"]`).
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Vec<String> = relative
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            if path.file_name().is_some_and(|n| n == "main.rs") {
                continue; // the binary: above everything, imported by nothing
            }
            found.insert(module, path);
        }
    }
    found
}

/// The module paths a file refers to through `crate::` and `super::`.
fn references(module: &[String], text: &str) -> Vec<Vec<String>> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut refs = Vec::new();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        // `super` of `a::b` is `a`, whether `b` is `a/b.rs` or `a/b/mod.rs`.
        ("super::", module[..module.len().saturating_sub(1)].to_vec()),
        ("self::", module.to_vec()),
    ] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let mut path = base.clone();
            let mut tail = rest;
            if let Some(group) = tail.strip_prefix('{') {
                refs.extend(grouped(&path, group));
                continue;
            }
            while let Some(end) = tail.find(|c: char| !(c.is_alphanumeric() || c == '_')) {
                path.push(tail[..end].to_string());
                if tail[end..].starts_with("::") && !tail[end + 2..].starts_with('{') {
                    tail = &tail[end + 2..];
                } else {
                    if let Some(group) = tail[end..].strip_prefix("::{") {
                        refs.extend(grouped(&path, group));
                    }
                    break;
                }
            }
            refs.push(path);
        }
    }
    refs
}

/// The paths of a `{a, b::c}` group (text after its `{`) under `path`.
fn grouped(path: &[String], group: &str) -> Vec<Vec<String>> {
    let close = group.find('}').unwrap_or(group.len());
    group[..close]
        .split(',')
        .map(|item| {
            let mut p = path.to_vec();
            p.extend(
                item.trim()
                    .split("::")
                    .take_while(|s| !s.is_empty() && !s.contains(['{', ' ']))
                    .map(str::to_string),
            );
            p
        })
        .collect()
}

/// The deepest known module a path names.
fn resolve(path: &[String], known: &BTreeMap<Vec<String>, PathBuf>) -> Option<Vec<String>> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains_key(p))
}

#[test]
fn no_import_circle_between_files_of_src() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    let mut arrows: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, path) in &known {
        let text = std::fs::read_to_string(path).unwrap();
        let targets = arrows.entry(module.clone()).or_default();
        for reference in references(module, &text) {
            if let Some(target) = resolve(&reference, &known) {
                if &target != module && !target.is_empty() {
                    targets.insert(target);
                }
            }
        }
    }
    // A circle exists when a module reaches itself.
    let mut circles = Vec::new();
    for start in arrows.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(Vec<String>, Vec<Vec<String>>)> =
            vec![(start.clone(), vec![start.clone()])];
        while let Some((at, trail)) = stack.pop() {
            for next in arrows.get(&at).into_iter().flatten() {
                if next == start {
                    let names: Vec<String> = trail.iter().map(|m| m.join("::")).collect();
                    circles.push(format!("{} -> {}", names.join(" -> "), start.join("::")));
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    assert!(
        arrows.values().map(BTreeSet::len).sum::<usize>() > 40,
        "the import reader found too few arrows to be trusted: {arrows:#?}"
    );
    assert!(
        circles.is_empty(),
        "import circles in src/ (each module listed with the path back to itself):\n{}",
        circles.join("\n")
    );
}
