//! The library's module graph has no cycle: every `crate::` path in `src/` is an edge from the
//! module whose file it is in to the module it names. A cycle (instance → snapshot → loader →
//! instance, say) makes a module impossible to understand or test without the others.

use std::collections::{BTreeMap, BTreeSet};

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
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn the_library_modules_form_no_cycle() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        let (Some(stem), Some("rs")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        if stem == "main" || stem == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let deps = references(&text)
            .into_iter()
            .filter(|d| d != stem && src.join(format!("{d}.rs")).exists())
            .collect();
        graph.insert(stem.to_string(), deps);
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
