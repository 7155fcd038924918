//! The house's layout, checked on every build of the tests (README,
//! "Layout"): `src/` is four layers — the runtime core, channel adapters,
//! products, the ops surface — and a module may import only from its own
//! layer or the ones below it. No two modules import each other, directly or
//! round a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each layer and the top-level modules of `src/` in it, bottom first.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "core",
        &[
            "config",
            "delivery",
            "edge",
            "engine",
            "http",
            "metrics",
            "notify",
            "openapi",
            "outbox",
            "pg",
            "pipeline",
            "scan",
            "schedules",
            "store",
            "telemetry",
            "workers",
        ],
    ),
    ("channels", &["channels"]),
    ("products", &["crew", "courier", "messaging", "intake"]),
    (
        "surface",
        &["admin", "api", "app", "bench", "console", "ops", "ops_cli"],
    ),
];

/// Imports that still point up, each to be removed (never added to): the
/// channel router still renders the moving product's crew posts itself.
const DEBT: &[(&str, &str)] = &[("channels::route", "crew")];

/// Every module of the library (`src/lib.rs` is `crate`; `main.rs` is the
/// binary, which uses the library from outside) with its source, test
/// modules left out.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix("src").unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts == ["main"] {
                continue;
            }
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let name = if parts.is_empty() {
                "crate".to_string()
            } else {
                parts.join("::")
            };
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(name, code);
        }
    }
    let mut out = BTreeMap::new();
    walk(Path::new("src"), &mut out);
    out
}

/// Module → the other modules it names (`crate::…` and `super::…` paths,
/// resolved to the longest module they start with; a module's own parent
/// is not an import).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let path = regex::Regex::new(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)").unwrap();
    let resolve = |segs: &[&str]| {
        (1..=segs.len())
            .rev()
            .map(|n| segs[..n].join("::"))
            .find(|c| modules.contains_key(c))
    };
    let mut graph = BTreeMap::new();
    for (name, code) in &modules {
        let mut to = BTreeSet::new();
        for cap in path.captures_iter(code) {
            let tail: Vec<&str> = cap[2].trim_start_matches("::").split("::").collect();
            let mut segs: Vec<&str> = if &cap[1] == "super" {
                let mut parent: Vec<&str> = name.split("::").collect();
                parent.pop();
                parent
            } else {
                vec![]
            };
            segs.extend(tail);
            if let Some(target) = resolve(&segs) {
                let is_ancestor = name.starts_with(&format!("{target}::"));
                if target != *name && !is_ancestor {
                    to.insert(target);
                }
            }
        }
        graph.insert(name.clone(), to);
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap();
    LAYERS.iter().position(|(_, ms)| ms.contains(&top))
}

#[test]
fn every_module_is_in_a_layer() {
    let unplaced: Vec<String> = modules()
        .into_keys()
        .filter(|m| m != "crate" && layer_of(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "put these in a layer (here and in the README's Layout): {unplaced:?}"
    );
}

#[test]
fn imports_point_down_the_layers_only() {
    let mut upward = BTreeSet::new();
    for (from, tos) in imports() {
        let Some(own) = layer_of(&from) else { continue };
        for to in tos {
            if layer_of(&to).is_some_and(|l| l > own) {
                upward.insert((from.clone(), to));
            }
        }
    }
    let debt: BTreeSet<(String, String)> = DEBT
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = upward.difference(&debt).collect();
    assert!(new.is_empty(), "imports pointing up a layer: {new:?}");
    let paid: Vec<_> = debt.difference(&upward).collect();
    assert!(paid.is_empty(), "gone, take them off DEBT: {paid:?}");
    // The core in particular imports nothing above it.
    for (from, to) in &upward {
        assert_ne!(layer_of(from), Some(0), "the core imports {to}");
    }
}

#[test]
fn no_import_cycle() {
    let graph = imports();
    // Depth-first search; a module met again while still on the path closes
    // a circle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| *p == m) {
            let mut circle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            circle.push(m.to_string());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m);
        for to in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(to, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(circle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", circle.join(" -> "));
        }
    }
}
