//! `cargo xtask tidy` (also the last step of `ci`): house-style checks over every Rust source
//! file in the workspace, run in process.
//!
//! Checked in every `.rs` file under `crates/`, `tests/`, `benches/` and `xtask/` (tracked or not;
//! `target/` and hidden directories are skipped):
//!
//! - the first line is a `//!` comment saying what the file owns (docs/conventions.md 9);
//! - no `dbg!`, `todo!` or `unimplemented!` calls outside test files (files under a `tests/`
//!   directory or named `*tests*.rs`); comment lines are not code and are ignored;
//! - in `crates/`, every `unsafe {` block and `unsafe impl` has a comment containing `SAFETY` on
//!   the same line or within the 3 non-blank lines above it; a longer block of comments (and
//!   attributes) directly above also counts, so a `// SAFETY:` paragraph may run past 3 lines;
//! - in the `src/` of `aio-core`, `timers` and `threadpool` ([`SYNC_CRATES`]), only `sync.rs`
//!   names `std::sync` or `parking_lot`: every atomic, lock, fence and shared pointer of their cross-thread protocols
//!   goes through the crate's `sync` module, so that the loom models check the real code;
//! - no trailing whitespace.
//!
//! Each violation is printed as `path:line: message`, and any violation fails the check. The
//! checks are pure functions of `(path, text)` so the unit tests below feed them small strings.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cmd::{Context, Error, Result, project_root};

/// Top-level directories that hold the workspace's Rust sources.
const ROOTS: &[&str] = &["crates", "tests", "benches", "xtask"];

/// Documents that comments used to cite and that live outside the repository: whoever clones
/// the project cannot follow them. (Split so that this line does not match itself.)
const OUTSIDE_DOCS: &[&str] = &[
    concat!("DESIGN", ".md"),
    concat!("qemu-aio-", "spec"),
    concat!("qemu-aio-", "tests"),
    concat!("style ", "guideline"),
    concat!("spec ", "§"),
    concat!("../", "shared"),
];

/// Macros that mark unfinished or debugging code. Spelled in two halves so that this file does
/// not trip its own check.
const FORBIDDEN_MACROS: &[&str] = &[
    concat!("db", "g!"),
    concat!("to", "do!"),
    concat!("unimpl", "emented!"),
];

/// Crates whose concurrency primitives come from their own `src/sync.rs` (the loom switch).
const SYNC_CRATES: &[&str] = &["aio-core", "timers", "threadpool"];

/// How many non-blank lines above an `unsafe` line may hold its `SAFETY` comment.
const SAFETY_WINDOW: usize = 3;

/// One broken rule at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Relative to the workspace root, with `/` separators.
    pub path: String,
    /// 1-based.
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path, self.line, self.msg)
    }
}

/// The `cargo xtask tidy` subcommand.
pub fn run() -> Result<ExitCode> {
    check(&project_root())?;
    Ok(ExitCode::SUCCESS)
}

/// Checks every Rust file under `root`'s source directories, prints the violations and fails if
/// there are any.
pub fn check(root: &Path) -> Result<()> {
    let mut files = Vec::new();
    for dir in ROOTS {
        collect_rust_files(&root.join(dir), &mut files)?;
    }

    let mut violations = Vec::new();
    for file in &files {
        let rel = relative_path(root, file);
        let bytes = std::fs::read(file).with_context(|| format!("reading {rel}"))?;
        match String::from_utf8(bytes) {
            Ok(text) => violations.extend(check_file(&rel, &text)),
            Err(_) => violations.push(Violation {
                path: rel,
                line: 1,
                msg: "not UTF-8".into(),
            }),
        }
    }

    // Every `docs/*.md` a source file cites exists.
    for file in &files {
        let rel = relative_path(root, file);
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            for doc in cited_docs(line) {
                if !root.join(&doc).exists() {
                    violations.push(Violation {
                        path: rel.clone(),
                        line: i + 1,
                        msg: format!("cites `{doc}`, which does not exist"),
                    });
                }
            }
        }
    }

    // A tree without ARCHITECTURE.md (a test's) has no code map to check.
    let map = "ARCHITECTURE.md";
    let text = std::fs::read_to_string(root.join(map)).unwrap_or_default();
    violations.extend(
        code_map_paths(&text)
            .into_iter()
            .filter(|(_, base, path)| {
                !root.join(base).join(path).exists() && !root.join(path).exists()
            })
            .map(|(line, base, path)| Violation {
                path: map.into(),
                line,
                msg: format!("the code map names `{path}` (under `{base}`), which does not exist"),
            }),
    );

    for violation in &violations {
        eprintln!("{violation}");
    }
    if violations.is_empty() {
        eprintln!("tidy: {} files checked, no violations", files.len());
        Ok(())
    } else {
        Err(Error::new(format!(
            "tidy: {} violation(s) in {} files checked (listed above)",
            violations.len(),
            files.len()
        )))
    }
}

/// Appends every `.rs` file under `dir` to `out`, in sorted order, skipping `target/` and hidden
/// directories. A missing `dir` contributes nothing.
fn collect_rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(Error::new(format!("reading {}: {err}", dir.display()))),
    };
    let mut entries = entries
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|entry| entry.file_name());

    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `file_type` does not follow symlinks, so a link cannot make the walk loop.
        let file_type = entry
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        if file_type.is_dir() {
            if name != "target" && !name.starts_with('.') {
                collect_rust_files(&path, out)?;
            }
        } else if file_type.is_file() && name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

fn relative_path(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap_or(file);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// All checks for one file. `path` is relative to the workspace root with `/` separators; it
/// decides which rules apply.
pub fn check_file(path: &str, text: &str) -> Vec<Violation> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = Vec::new();
    let mut report = |line: usize, msg: String| {
        out.push(Violation {
            path: path.to_owned(),
            line,
            msg,
        });
    };

    if !lines[0].starts_with("//!") {
        report(
            1,
            "file must start with a `//!` comment saying what it owns".into(),
        );
    }

    let test_file = is_test_file(path);
    let in_crates = path.starts_with("crates/");
    for (idx, line) in lines.iter().enumerate() {
        let lineno = idx + 1;
        let is_comment = line.trim_start().starts_with("//");

        if let Some(name) = OUTSIDE_DOCS.iter().find(|d| line.contains(*d)) {
            report(
                lineno,
                format!(
                    "cites `{name}`, which is not in the repository (cite docs/ instead: \
                     docs/qemu-semantics.md, docs/benchmarks.md, docs/conventions.md)"
                ),
            );
        }

        if !test_file
            && !is_comment
            && let Some(name) = FORBIDDEN_MACROS.iter().find(|m| calls_macro(line, m))
        {
            report(lineno, format!("`{name}` outside test code"));
        }

        if in_crates
            && !is_comment
            && (line.contains("unsafe {") || line.contains("unsafe impl"))
            && !has_safety_comment(&lines, idx)
        {
            report(
                lineno,
                "`unsafe` without a `// SAFETY:` comment just above".into(),
            );
        }

        if !is_comment
            && (line.contains("std::sync") || line.contains("parking_lot"))
            && must_use_sync_module(path)
        {
            report(
                lineno,
                "concurrency primitives come from the crate's `sync` module (loom switch)".into(),
            );
        }

        if line.ends_with(char::is_whitespace) {
            report(lineno, "trailing whitespace".into());
        }
    }
    out
}

/// Library files of the [`SYNC_CRATES`] other than the `sync` facade itself.
fn must_use_sync_module(path: &str) -> bool {
    SYNC_CRATES
        .iter()
        .any(|krate| path.starts_with(&format!("crates/{krate}/src/")))
        && !path.ends_with("/sync.rs")
}

/// Test code may use the forbidden macros: files under a `tests` directory, or named `*tests*.rs`.
fn is_test_file(path: &str) -> bool {
    let mut components = path.split('/').rev();
    let file_name = components.next().unwrap_or_default();
    file_name.contains("tests") || components.any(|dir| dir == "tests")
}

/// Whether `line` invokes `mac` (spelled with its `!`) as a macro: `name!(`, `name![` or
/// `name!{`, not preceded by an identifier character (a longer name ending in the same letters
/// is someone else's macro).
fn calls_macro(line: &str, mac: &str) -> bool {
    line.match_indices(mac).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + mac.len()..].trim_start().chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && matches!(after, Some('(' | '[' | '{'))
    })
}

/// Whether the `unsafe` on line `idx` is explained by a `SAFETY` comment: on the same line, within
/// [`SAFETY_WINDOW`] non-blank lines above, or anywhere in an unbroken block of comments (and
/// attributes) directly above it.
fn has_safety_comment(lines: &[&str], idx: usize) -> bool {
    if lines[idx].contains("SAFETY") {
        return true;
    }
    let mut seen = 0;
    let mut only_comments = true;
    for line in lines[..idx].iter().rev() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.contains("SAFETY") {
            return true;
        }
        seen += 1;
        // Attributes such as `#[allow(..)]` may sit between a comment and its item.
        only_comments &= line.starts_with("//") || line.starts_with("#[");
        if seen >= SAFETY_WINDOW && !only_comments {
            return false;
        }
    }
    false
}

/// The `docs/<name>.md` paths a line cites.
pub fn cited_docs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("docs/") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-_./".contains(c)))
            .unwrap_or(tail.len());
        let cand = tail[..end].trim_end_matches('.');
        if cand.ends_with(".md") {
            out.push(cand.to_owned());
        }
        rest = &tail[5..];
    }
    out
}

/// The paths ARCHITECTURE.md's code map names: the first code span of each bullet in the
/// "Code map" section, with the directory of the `### `dir`` heading it sits under (empty for
/// a heading that is not a path). Returns (line, directory, path); patterns (`*`, `{`) and
/// spans with spaces are not paths and are skipped.
pub fn code_map_paths(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut in_map = false;
    let mut base: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(title) = line.strip_prefix("## ") {
            in_map = title.trim() == "Code map";
            base = None;
            continue;
        }
        if !in_map {
            continue;
        }
        if let Some(rest) = line.strip_prefix("### ") {
            base = Some(
                rest.strip_prefix('`')
                    .and_then(|r| r.split('`').next())
                    .map_or_else(String::new, |d| d.trim_end_matches('/').to_owned()),
            );
            continue;
        }
        let (Some(dir), Some(rest)) = (&base, line.strip_prefix("- `")) else {
            continue;
        };
        let Some(path) = rest.split('`').next() else {
            continue;
        };
        if path.contains(['*', '{', ' ']) {
            continue;
        }
        out.push((i + 1, dir.clone(), path.to_owned()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn cited_docs_are_found_in_a_line() {
        assert_eq!(
            super::cited_docs(concat!(
                "// see docs/",
                "a.md §2 and docs/",
                "b-c.md. Not docs/d/"
            )),
            vec![
                concat!("docs/", "a.md").to_owned(),
                concat!("docs/", "b-c.md").to_owned()
            ]
        );
    }

    #[test]
    fn a_citation_of_a_document_outside_the_repository_is_reported() {
        let text = concat!("//! Owns x (", "DESIGN", ".md §8).\nfn f() {}\n");
        let v = super::check_file("crates/a/src/lib.rs", text);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].msg.contains("not in the repository"));
    }

    #[test]
    fn code_map_paths_are_taken_from_the_code_map_bullets_with_their_heading() {
        let text = "# A\n- `nope.rs`: not in the map\n## Code map\n### Workspace root\n\
                    - `Cargo.toml`: x\n### `crates/core`\n- `src/lib.rs`: y, `src/other.rs`\n\
                    - `tests/loom_*.rs`: a pattern\n  - `src/nested.rs`: not a top bullet\n\
                    ## Next\n- `late.rs`: after the map\n";
        assert_eq!(
            super::code_map_paths(text),
            vec![
                (5, String::new(), "Cargo.toml".to_owned()),
                (7, "crates/core".to_owned(), "src/lib.rs".to_owned()),
            ]
        );
    }

    use super::*;

    // Assembled at run time so this file's own text stays clean for tidy.
    fn dbg_call() -> String {
        format!("{}(x)", FORBIDDEN_MACROS[0])
    }

    fn lines_of(violations: &[Violation]) -> Vec<usize> {
        violations.iter().map(|v| v.line).collect()
    }

    #[test]
    fn clean_file_passes() {
        let src = "//! Owns nothing.\n\nfn main() {}\n";
        assert_eq!(check_file("crates/a/src/lib.rs", src), []);
    }

    #[test]
    fn first_line_must_be_module_doc() {
        for src in [
            "",
            "\n//! late\n",
            "/// item doc\nfn f() {}\n",
            "#![cfg(aio_loom)]\n//! x\n",
        ] {
            let v = check_file("crates/a/src/lib.rs", src);
            assert_eq!(lines_of(&v), [1], "{src:?}: {v:?}");
            assert!(v[0].msg.contains("//!"));
        }
    }

    #[test]
    fn violation_prints_as_path_line_message() {
        let v = check_file("xtask/src/x.rs", "fn f() {}\n");
        assert_eq!(
            v[0].to_string(),
            "xtask/src/x.rs:1: file must start with a `//!` comment saying what it owns"
        );
    }

    #[test]
    fn forbidden_macros_flagged_in_library_code() {
        for mac in FORBIDDEN_MACROS {
            let src = format!("//! x\nfn f() {{\n    {mac}();\n}}\n");
            let v = check_file("crates/a/src/lib.rs", &src);
            assert_eq!(lines_of(&v), [3], "{mac}: {v:?}");
            assert!(v[0].msg.contains(mac));
        }
        let braces = format!("//! x\nfn f() {{ {}{{}} }}\n", FORBIDDEN_MACROS[1]);
        assert_eq!(lines_of(&check_file("xtask/src/x.rs", &braces)), [2]);
    }

    #[test]
    fn forbidden_macros_allowed_in_tests_and_comments() {
        let src = format!("//! x\nfn f() {{ {} }}\n", dbg_call());
        assert_eq!(check_file("crates/a/tests/context.rs", &src), []);
        assert_eq!(check_file("tests/src/lib.rs", &src), []);
        assert_eq!(check_file("crates/a/src/unit_tests.rs", &src), []);
        let comment = format!("//! x\n/// Never call `{}` here.\n", dbg_call());
        assert_eq!(check_file("crates/a/src/lib.rs", &comment), []);
    }

    #[test]
    fn other_macros_with_similar_names_pass() {
        let src = format!(
            "//! x\nmy_{}\nlet {} = 1;\n",
            dbg_call(),
            &FORBIDDEN_MACROS[0][..3]
        );
        assert_eq!(check_file("crates/a/src/lib.rs", &src), []);
    }

    #[test]
    fn unsafe_needs_safety_within_three_lines() {
        let ok = "//! x\n// SAFETY: fd is open.\nlet a = 1;\n\nlet b = 2;\nunsafe { f() };\n";
        assert_eq!(check_file("crates/a/src/sys.rs", ok), []);

        let too_far =
            "//! x\n// SAFETY: fd is open.\nlet a = 1;\nlet b = 2;\nlet c = 3;\nunsafe { f() };\n";
        assert_eq!(lines_of(&check_file("crates/a/src/sys.rs", too_far)), [6]);

        let missing = "//! x\nunsafe impl Send for X {}\n";
        assert_eq!(lines_of(&check_file("crates/a/src/sys.rs", missing)), [2]);

        let same_line = "//! x\nlet n = unsafe { f() }; // SAFETY: f has no preconditions.\n";
        assert_eq!(check_file("crates/a/src/sys.rs", same_line), []);
    }

    #[test]
    fn long_safety_comment_block_counts() {
        let src = "//! x\n// SAFETY: one\n// two\n// three\n// four\n#[allow(x)]\nunsafe impl Sync for X {}\n";
        assert_eq!(check_file("crates/a/src/sys.rs", src), []);
        // A SAFETY comment that belongs to earlier code does not count.
        let broken =
            "//! x\n// SAFETY: old\n// two\nlet a = 1;\n// three\n// four\nunsafe { f() };\n";
        assert_eq!(lines_of(&check_file("crates/a/src/sys.rs", broken)), [7]);
    }

    #[test]
    fn unsafe_rule_only_applies_to_crates_and_code() {
        let src = "//! x\nunsafe { f() };\n";
        assert_eq!(check_file("xtask/src/x.rs", src), []);
        assert_eq!(check_file("benches/src/lib.rs", src), []);
        let doc = "//! x\n/// Callers write `unsafe { f() }`.\n";
        assert_eq!(check_file("crates/a/src/lib.rs", doc), []);
        let unsafe_fn = "//! x\n/// # Safety\n/// None.\npub unsafe fn f() {}\n";
        assert_eq!(check_file("crates/a/src/lib.rs", unsafe_fn), []);
    }

    #[test]
    fn std_sync_and_parking_lot_only_through_the_sync_module() {
        let src = "//! x\nuse std::sync::Arc;\n";
        assert_eq!(
            lines_of(&check_file("crates/aio-core/src/bh.rs", src)),
            vec![2]
        );
        let lock = "//! x\nuse parking_lot::Mutex;\n";
        for path in ["crates/timers/src/list.rs", "crates/threadpool/src/pool.rs"] {
            assert_eq!(lines_of(&check_file(path, src)), vec![2], "{path}");
            assert_eq!(lines_of(&check_file(path, lock)), vec![2], "{path}");
        }
        assert!(check_file("crates/timers/src/sync.rs", lock).is_empty());
        assert!(check_file("crates/threadpool/tests/cancel.rs", src).is_empty());
        assert!(check_file("crates/aio-core/src/sync.rs", src).is_empty());
        assert!(check_file("crates/conformance/src/support.rs", src).is_empty());
        assert!(check_file("crates/aio-core/tests/loom_bh.rs", src).is_empty());
        assert!(check_file("crates/fdmon-poll/src/lib.rs", src).is_empty());
        let comment = "//! x\n// std::sync is not used here\n";
        assert!(check_file("crates/aio-core/src/bh.rs", comment).is_empty());
    }

    #[test]
    fn trailing_whitespace_flagged() {
        let src = "//! x\nlet a = 1; \nlet b = 2;\t\nlet c = 3;\r\nlet d = 4;\n";
        assert_eq!(lines_of(&check_file("xtask/src/x.rs", src)), [2, 3, 4]);
    }

    #[test]
    fn test_file_detection() {
        assert!(is_test_file("crates/aio-core/tests/loom_notify.rs"));
        assert!(is_test_file("tests/tests/backend_matrix.rs"));
        assert!(is_test_file("crates/a/src/tests.rs"));
        assert!(!is_test_file("crates/a/src/lib.rs"));
        assert!(!is_test_file("crates/testsuite-free/src/lib.rs"));
    }

    #[test]
    fn walk_finds_rs_files_and_skips_target_and_hidden() {
        let root = std::env::temp_dir().join(format!("xtask-tidy-walk-{}", std::process::id()));
        for dir in [
            "crates/a/src",
            "crates/a/target/debug",
            "xtask/.hidden",
            "other",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for file in [
            "crates/a/src/lib.rs",
            "crates/a/src/notes.md",
            "crates/a/target/debug/build.rs",
            "xtask/.hidden/x.rs",
            "other/outside.rs",
        ] {
            std::fs::write(root.join(file), "fn f() {}\n").unwrap();
        }
        let mut files = Vec::new();
        for dir in ROOTS {
            collect_rust_files(&root.join(dir), &mut files).unwrap();
        }
        let rel: Vec<_> = files.iter().map(|f| relative_path(&root, f)).collect();
        let result = check(&root);
        std::fs::remove_dir_all(&root).unwrap();

        assert_eq!(rel, ["crates/a/src/lib.rs"]);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("1 violation(s) in 1 files"), "{err}");
    }
}
