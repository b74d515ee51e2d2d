//! The engine crate's modules import one way, and so do the I/O crate's: no module imports
//! from a module that imports it, directly or through others (docs/ARCHITECTURE.md).
//!
//! Read from the sources: every `crate::` path outside comments (in `use` lines and in
//! code, test modules included), with names that the crate root re-exports
//! (`crate::Tensor`, `pub use m::{A as B}`) followed to the module that defines them.
//! Not read: `super::` paths (top-level modules here write `crate::`), `$crate::` in
//! macros. A module in a folder (`remote/`) is read as one module, all its files together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules each module of the crate whose sources are in `src` (beside this crate's
/// folder) names.
fn graph(src: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        let stem = path.file_stem().expect("stem").to_string_lossy().into_owned();
        if path.is_dir() {
            // One module: its files together (paths among them name the module itself).
            for file in std::fs::read_dir(&path).expect("module folder") {
                let file = file.expect("entry").path();
                if file.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&file).expect("read");
                    sources.entry(stem.clone()).or_default().push_str(&text);
                }
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            sources.entry(stem).or_default().push_str(&std::fs::read_to_string(&path).expect("read"));
        }
    }
    let lib = sources.remove("lib").expect("lib.rs");
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    // `pub use module::{A, B};` and `pub use module::A;` at the root: A and B live in module.
    let mut reexported = BTreeMap::new();
    for (path, _) in crate_paths(&code(&lib), "") {
        // `pub use crate::m::A` and `pub use self::m::A` are `pub use m::A`.
        let path = match path.first().map(String::as_str) {
            Some("crate" | "self") => &path[1..],
            _ => &path[..],
        };
        if let [module, item] = path {
            // `A as B` re-exports A as B.
            let item = item.rsplit(" as ").next().unwrap_or(item);
            if modules.contains(module) {
                reexported.insert(item.to_owned(), module.clone());
            }
        }
    }
    let mut graph = BTreeMap::new();
    for (name, text) in &sources {
        let mut names = BTreeSet::new();
        for (path, _) in crate_paths(&code(text), "crate::") {
            // `crate::Tensor as T` names Tensor.
            let first = path[0].split(" as ").next().unwrap_or(&path[0]).to_owned();
            let module = if modules.contains(&first) { Some(&first) } else { reexported.get(&first) };
            if let Some(m) = module {
                if m != name {
                    names.insert(m.clone());
                }
            }
        }
        graph.insert(name.clone(), names);
    }
    graph
}

/// `text` without comments (line comments, doc comments included).
fn code(text: &str) -> String {
    // Block comments first (not nested in this crate), then line comments.
    let mut rest = text;
    let mut out = String::new();
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        rest = rest[start + 2..].split_once("*/").map_or("", |(_, after)| after);
    }
    out.push_str(rest);
    out.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every path that follows `prefix` (`crate::`), expanded through `{..}` groups, as its
/// segments; with `prefix` empty, the paths of `pub use` lines.
fn crate_paths(text: &str, prefix: &str) -> Vec<(Vec<String>, usize)> {
    let mut out = Vec::new();
    let starts: Vec<usize> = if prefix.is_empty() {
        let mut starts: Vec<usize> = ["pub use ", "pub(crate) use "]
            .iter()
            .flat_map(|p| text.match_indices(p).map(|(i, m)| i + m.len()))
            .collect();
        starts.sort_unstable();
        starts
    } else {
        text.match_indices(prefix)
            .filter(|(i, _)| !text[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':'))
            .map(|(i, m)| i + m.len())
            .collect()
    };
    for start in starts {
        expand(&text[start..], Vec::new(), &mut out, start);
    }
    out
}

/// The paths at the start of `s` (`a::b::{c, d::e}` gives a::b::c and a::b::d::e).
fn expand(s: &str, mut base: Vec<String>, out: &mut Vec<(Vec<String>, usize)>, at: usize) {
    let mut rest = s.trim_start();
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut end = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            let mut depth = 0;
            let mut item = 0;
            for (i, c) in group[..end].char_indices().chain([(end, ',')]) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let part = &group[item..i];
                        if !part.trim().is_empty() {
                            expand(part, base.clone(), out, at);
                        }
                        item = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let ident: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if ident.is_empty() {
            break;
        }
        rest = &rest[ident.len()..];
        // `A as B`: the name it goes by is B.
        if let Some(alias) = rest.trim_start().strip_prefix("as ") {
            let alias: String = alias.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            base.push(format!("{ident} as {alias}"));
            break;
        }
        // `a::{self, ..}` names a itself.
        if ident != "self" || base.is_empty() {
            base.push(ident.clone());
        }
        match rest.strip_prefix("::") {
            Some(r) => rest = r.trim_start(),
            None => break,
        }
    }
    if !base.is_empty() && base[0] != "self" && base[0] != "super" {
        out.push((base, at));
    }
}

/// A cycle of `graph`, as the modules along it, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first, with the path so far: an edge back into the path closes a cycle.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn assert_acyclic(src: &str) {
    let graph = graph(src);
    assert!(graph.len() >= 10, "the modules were not found: {graph:?}");
    if let Some(c) = cycle(&graph) {
        let edges: Vec<String> = graph.iter().map(|(k, v)| format!("{k} -> {v:?}")).collect();
        panic!("{src}: import cycle: {}\n\nthe graph:\n{}", c.join(" -> "), edges.join("\n"));
    }
}

#[test]
fn the_engine_modules_have_no_import_cycle() {
    assert_acyclic("src");
}

#[test]
fn the_io_modules_have_no_import_cycle() {
    assert_acyclic("../tensorlift-io/src");
}

#[test]
fn the_cuda_modules_have_no_import_cycle() {
    assert_acyclic("../tensorlift-cuda/src");
}

/// The reading itself: paths through groups and root re-exports, comments skipped, and a
/// cycle found where there is one.
#[test]
fn the_reading_finds_paths_and_cycles() {
    let text = code("use crate::a::{self, B, c::{D, E}};\nuse crate::F; // crate::zz\nfn f() { crate::g::h(); }\n");
    let paths: Vec<String> = crate_paths(&text, "crate::").into_iter().map(|(p, _)| p.join("::")).collect();
    assert_eq!(paths, ["a", "a::B", "a::c::D", "a::c::E", "F", "g::h"]);
    let lib = "pub use m::{X, Y as W};\npub use n::Z;\npub(crate) use o::V; /* crate::p::Q */\n";
    let paths: Vec<String> = crate_paths(&code(lib), "").into_iter().map(|(p, _)| p.join("::")).collect();
    assert_eq!(paths, ["m::X", "m::Y as W", "n::Z", "o::V"]);
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(cycle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).map(|c| c.join(">")), Some("a>b>c>a".into()));
}
