//! The layout rules ARCHITECTURE.md states, checked on the source tree: the top-level modules of
//! `src/` depend on each other without cycles, `oci/` (the vocabulary) depends on nothing else in
//! the crate, and no file is over 700 lines before its tests.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const MAX_LINES: usize = 700;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read src dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The code of a file before its test module, without comments.
fn code_before_tests(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect()
}

/// The top-level module a file belongs to (`oci` for `src/oci/range.rs`, `daemon` for
/// `src/daemon.rs`).
fn top_module(file: &Path) -> String {
    let rel = file.strip_prefix(src()).expect("under src");
    let first = rel.components().next().expect("non-empty path");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// The top-level modules a piece of code names through `crate::`, directly or in a `use crate::{…}`
/// group.
fn crate_references(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            // Only the first segment of each entry of the group, at nesting depth 0.
            let mut depth = 0;
            let mut entries = Vec::new();
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        entries.push(&group[start..i]);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        entries.push(&group[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            entries
        } else {
            vec![rest]
        };
        for name in names {
            let ident: String = name
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&ident) {
                refs.insert(ident);
            }
        }
    }
    refs
}

fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<PathBuf> = rust_files(&src())
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "tests.rs"))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|f| top_module(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("read source");
        let code = code_before_tests(&text).join("\n");
        let from = top_module(file);
        let deps = graph.entry(from.clone()).or_default();
        for to in crate_references(&code, &modules) {
            if to != from {
                deps.insert(to);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_owned());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn top_level_modules_have_no_cycles() {
    let graph = dependency_graph();
    assert!(graph.len() > 10, "found too few modules: {graph:?}");
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!(
                "modules depend on each other in a cycle: {}",
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn the_vocabulary_depends_on_nothing_else() {
    let graph = dependency_graph();
    let oci = graph.get("oci").expect("an oci module");
    assert!(oci.is_empty(), "oci/ depends on {oci:?}");
}

#[test]
fn no_source_file_is_over_the_limit() {
    let long: Vec<String> = rust_files(&src())
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "tests.rs"))
        .filter_map(|f| {
            let text = fs::read_to_string(&f).expect("read source");
            let lines = text
                .lines()
                .take_while(|line| line.trim() != "#[cfg(test)]")
                .count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

#[test]
fn references_are_found_in_groups_and_paths() {
    let modules: BTreeSet<String> = ["oci", "body", "source"].map(String::from).into();
    let code = "use crate::{\n    body::{self, BoxBody},\n    oci::{Kind, digest::Digest},\n};\nlet x = crate::source::Chain::new();";
    let found = crate_references(code, &modules);
    assert_eq!(found, modules);
    let none = crate_references("use crate::{config::X, daemon};", &modules);
    assert!(none.is_empty());
}
