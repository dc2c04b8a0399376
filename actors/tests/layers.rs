//! The crate's layering, checked from its sources: no import circle among the files of
//! `actors/src`, only the layers above the gateway import it, and the pure decisions' crate
//! depends on nothing async.
//!
//! A file's imports are the `crate::…` paths and `super::…` names it uses outside comments and
//! its inline test module; each names the file of the module it reaches.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`mesh::caller`) → file, for every source file but test files.
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                let rel = path.strip_prefix(root).expect("under the root");
                let name = rel
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("::");
                out.insert(name, path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The code of a file: without comments and without its inline test module.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("readable source");
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers of a path that starts at `at` in `text` (`a::b::{c, d::e}` → `[a::b::c,
/// a::b::d::e]`, enough to name the modules reached).
fn paths_at(text: &str, at: usize) -> Vec<String> {
    let rest = &text[at..];
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    let head = rest[..end].trim_end_matches(':').to_owned();
    if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
        let close = rest[end..].find('}').map_or(rest.len(), |i| end + i);
        rest[end + 1..close]
            .split(',')
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| format!("{head}::{p}"))
            .collect()
    } else {
        vec![head]
    }
}

/// The modules each module's file imports.
fn imports(mods: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|m| mods.contains_key(m))
    };
    let mut out = BTreeMap::new();
    for (module, file) in mods {
        let text = code(file);
        let parent = module.rsplit_once("::").map(|(p, _)| p.to_owned());
        let mut reached = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            for p in paths_at(&text, i + "crate::".len()) {
                reached.extend(resolve(&p));
            }
        }
        for (i, _) in text.match_indices("super::") {
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            for p in paths_at(&text, i + "super::".len()) {
                let full = match &parent {
                    Some(parent) => format!("{parent}::{p}"),
                    None => p,
                };
                reached.extend(resolve(&full));
            }
        }
        reached.remove(module);
        reached.remove("lib");
        out.insert(module.clone(), reached);
    }
    out
}

/// The import circles (strongly connected groups of more than one file).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reaches(m))).collect();
    let mut found: Vec<Vec<String>> = Vec::new();
    for m in graph.keys() {
        let group: Vec<String> = graph
            .keys()
            .filter(|o| *o == m || (reach[m].contains(*o) && reach[*o].contains(m)))
            .cloned()
            .collect();
        if group.len() > 1 && !found.contains(&group) {
            found.push(group);
        }
    }
    found
}

#[test]
fn no_file_of_the_crate_is_in_an_import_circle() {
    let graph = imports(&modules());
    let found = circles(&graph);
    let described: Vec<String> = found
        .iter()
        .map(|group| {
            let arrows: Vec<String> = group
                .iter()
                .flat_map(|a| {
                    graph[a]
                        .iter()
                        .filter(|b| group.contains(b))
                        .map(move |b| format!("{a} -> {b}"))
                })
                .collect();
            arrows.join(", ")
        })
        .collect();
    assert!(found.is_empty(), "import circles: {}", described.join("; "));
}

#[test]
fn the_checker_finds_a_circle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_owned(), to.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(circles(&graph), vec![vec!["a", "b", "c"]]);
    assert_eq!(
        paths_at("use crate::x::{y, z::w};", "use crate::".len()),
        ["x::y", "x::z::w"]
    );
}

/// Only the layers above the gateway (the pipeline, the actor mesh, the vLLM supervisor)
/// import it; everything else is given what it needs.
#[test]
fn nothing_below_the_gateway_imports_it() {
    let graph = imports(&modules());
    let above = [
        "pipeline",
        "pipeline::stream",
        "mesh",
        "mesh::forward",
        "vllm::actor",
        "vllm::supervisor",
    ];
    let below: Vec<&String> = graph
        .iter()
        // The gateway's own modules (`gateway::routing`) are the gateway.
        .filter(|(m, to)| {
            to.contains("gateway") && !above.contains(&m.as_str()) && !m.starts_with("gateway::")
        })
        .map(|(m, _)| m)
        .collect();
    assert!(
        below.is_empty(),
        "import the gateway from below it: {below:?}"
    );
}

/// The pure decisions (the `meridian-policy` crate) stay pure: the compiler keeps out what the
/// crate does not depend on, and this keeps its dependencies free of an async runtime, an actor
/// framework, HTTP, or another Meridian crate.
#[test]
fn the_policy_crate_depends_on_nothing_async() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("the policy crate's manifest");
    let deps: Vec<&str> = text
        .split("\n[")
        .filter(|section| section.starts_with("dependencies]"))
        .flat_map(|section| section.lines().skip(1))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['.', '=', ' ']).next())
        .collect();
    assert!(!deps.is_empty(), "no [dependencies] read from {manifest:?}");
    for dep in &deps {
        assert!(
            ["time"].contains(dep),
            "meridian-policy depends on {dep:?}: only `time` is allowed (add a pure crate here \
             only after checking it pulls in no runtime, actor framework or HTTP type)"
        );
    }
}
