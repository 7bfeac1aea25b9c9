//! The library's module graph has no cycle: every `crate::` path in `src/` is an edge from the
//! module whose file it is in to the module it names. A cycle (instance → snapshot → loader →
//! instance, say) makes a module impossible to understand or test without the others.

use std::collections::{BTreeMap, BTreeSet};

/// Folders whose `mod.rs` only groups modules: a path through one names the module inside.
const FOLDERS: &[&str] = &["dataplane", "telemetry", "offline"];

/// The first path segment of every `crate::…` reference in `text`, including each item of a
/// `use crate::{a::…, b, c::{…}}` group.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 0 of the group: the first identifier after the `{` or a `,`.
            let mut depth = 0;
            let mut expect_name = true;
            let mut name = String::new();
            for c in group.chars() {
                let ident = c.is_alphanumeric() || c == '_';
                if ident && expect_name && depth == 0 {
                    name.push(c);
                    continue;
                }
                if !name.is_empty() {
                    out.insert(std::mem::take(&mut name));
                    expect_name = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => expect_name = true,
                    _ => {}
                }
            }
            if !name.is_empty() {
                out.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // `crate::folder::module::…`: the module is the second segment.
            let after = &rest[name.len()..];
            let second: String = after
                .strip_prefix("::")
                .unwrap_or("")
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if FOLDERS.contains(&name.as_str()) && !second.is_empty() {
                out.insert(second);
            } else if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A module's name: its file's stem, or its folder's for a `mod.rs`.
fn module_name(path: &std::path::Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).expect("stem");
    if stem == "mod" {
        path.parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
            .expect("folder")
            .to_string()
    } else {
        stem.to_string()
    }
}

#[test]
fn the_library_modules_form_no_cycle() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    // Leaf module names are unique across the tree (the crate root re-exports each of them),
    // so a `crate::x` or `crate::folder::x` path names module `x`.
    let modules: BTreeSet<String> = files.iter().map(|f| module_name(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &files {
        let name = module_name(path);
        if name == "main" || name == "lib" || name == "src" {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("read");
        let deps = references(&text)
            .into_iter()
            .filter(|d| *d != name && modules.contains(d))
            .collect();
        graph
            .entry(name)
            .or_default()
            .extend::<BTreeSet<String>>(deps);
    }
    assert!(graph.len() >= 10, "read too few modules: {graph:?}");
    // Depth-first search with an explicit path: a back edge is a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            panic!("module cycle: {}", cycle.join(" → "));
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn use_groups_are_read_item_by_item() {
    let text = "use crate::{\n    catalogue::{Catalogue, X},\n    compile,\n    loader::{a::b, C},\n};\nlet x = crate::metrics::fetch();";
    let got: Vec<String> = references(text).into_iter().collect();
    assert_eq!(got, ["catalogue", "compile", "loader", "metrics"]);
}
