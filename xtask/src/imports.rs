//! The workspace's file import graph, for the invariant "files import
//! downwards only" (ARCHITECTURE.md): every `use crate::...`, `super::...`
//! and inline `crate::x::y` path of a crate's `src/` (tests modules left
//! out) is an edge from its file to the file of the longest module path it
//! names; a strongly connected set of more than one file is a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// The crate's files by module path (`lib.rs`/`main.rs` are the root, `[]`).
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = rel
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|l| l == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                module.clear();
            }
            if let Ok(text) = std::fs::read_to_string(&path) {
                out.insert(module, code_of(&text));
            }
        }
    }
    out
}

/// The text without comments and without the `#[cfg(test)] mod tests`
/// module (written last, by convention).
fn code_of(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let cut = code.find("#[cfg(test)]\nmod tests").unwrap_or(code.len());
    code[..cut].to_string()
}

/// Every `crate::`/`super::`/`self::` path in `code`, `use` trees expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for statement in code.split(';') {
        let at = statement.match_indices("use ").map(|(i, _)| i).find(|&i| {
            statement[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
        });
        if let Some(at) = at {
            expand(statement[at + 4..].trim(), &[], &mut out);
        }
    }
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    for word in code.split(|c: char| !ident(c)) {
        if word.starts_with("crate::") || word.starts_with("super::") {
            out.push(
                word.split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            );
        }
    }
    out.retain(|p| {
        matches!(
            p.first().map(String::as_str),
            Some("crate" | "super" | "self")
        )
    });
    out
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let mut path = prefix.to_vec();
        path.extend(
            tree.split_whitespace()
                .next()
                .unwrap_or("")
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
        out.push(path);
        return;
    };
    let mut path = prefix.to_vec();
    path.extend(
        tree[..open]
            .split("::")
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().to_string()),
    );
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&inner[start..i], &path, out);
                start = i + 1;
            }
            _ => {}
        }
    }
    expand(&inner[start..], &path, out);
}

/// The edges of the crate's import graph.
fn graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = modules(src);
    let mut graph = BTreeMap::new();
    for (module, code) in &files {
        let mut edges = BTreeSet::new();
        for path in paths(code) {
            let mut base: Module = match path[0].as_str() {
                "crate" => Vec::new(),
                _ => module.clone(),
            };
            let mut rest = &path[1..];
            if path[0] == "super" {
                base.pop();
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
            }
            base.extend(rest.iter().cloned());
            let target = (1..=base.len())
                .rev()
                .map(|n| base[..n].to_vec())
                .find(|m| files.contains_key(m));
            if let Some(target) = target {
                if &target != module {
                    edges.insert(target);
                }
            }
        }
        graph.insert(module.clone(), edges);
    }
    graph
}

/// Sets of files that import each other (Tarjan's strongly connected
/// components of more than one file).
pub fn cycles(src: &Path) -> Vec<Vec<String>> {
    let graph = graph(src);
    let names: Vec<&Module> = graph.keys().collect();
    let index_of = |m: &Module| names.iter().position(|n| *n == m).unwrap();
    let edges: Vec<Vec<usize>> = names
        .iter()
        .map(|m| graph[*m].iter().map(index_of).collect())
        .collect();
    struct Tarjan<'a> {
        edges: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        stack: Vec<usize>,
        on_stack: Vec<bool>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.edges[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(i) if self.on_stack[w] => self.low[v] = self.low[v].min(i),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.out.push(component);
                }
            }
        }
    }
    let n = names.len();
    let mut t = Tarjan {
        edges: &edges,
        index: vec![None; n],
        low: vec![0; n],
        stack: Vec::new(),
        on_stack: vec![false; n],
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    t.out
        .into_iter()
        .map(|c| {
            let mut c: Vec<String> = c.into_iter().map(|i| names[i].join("::")).collect();
            c.sort();
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_trees_expand() {
        let mut out = Vec::new();
        expand("crate::a::{b, c::{d, e as f}, self}", &[], &mut out);
        let joined: Vec<String> = out.iter().map(|p| p.join("::")).collect();
        assert_eq!(
            joined,
            [
                "crate::a::b",
                "crate::a::c::d",
                "crate::a::c::e",
                "crate::a::self"
            ]
        );
    }

    #[test]
    fn finds_a_cycle_and_none_in_the_workspace() {
        let dir = std::env::temp_dir().join(format!("xtask-imports-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m")).unwrap();
        std::fs::write(dir.join("lib.rs"), "mod a;\nmod m;\n").unwrap();
        std::fs::write(dir.join("a.rs"), "use crate::m::x::Y;\n").unwrap();
        std::fs::write(dir.join("m/mod.rs"), "mod x;\n").unwrap();
        std::fs::write(dir.join("m/x.rs"), "fn f() { crate::a::g() }\n").unwrap();
        let found = cycles(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, [vec!["a".to_string(), "m::x".to_string()]]);

        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for krate in [
            "runner-telemetry",
            "ci-runner",
            "fake-rails",
            "conformance",
            "xtask",
        ] {
            let found = cycles(&root.join(krate).join("src"));
            assert!(
                found.is_empty(),
                "{krate}: files import each other: {found:?}"
            );
        }
    }
}
