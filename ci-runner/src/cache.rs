//! The local cache of the shell executor: one zip archive per project and
//! key, `<cache_dir>/<project path>/<key>/cache.zip` (GitLab Runner's layout
//! for a runner without a distributed cache), restored before the script and
//! written after it.
//!
//! Restore tries the key, then each of `fallback_keys`, then the job
//! variable `CACHE_FALLBACK_KEY`; the first archive found is extracted into
//! the build directory. Archiving always writes the job's own key (never a
//! fallback), to a temporary file renamed into place, so a job reading the
//! cache never sees half an archive.

use std::path::{Path, PathBuf};

use super::archive;
use super::payload::CacheEntry;
use super::shell::{self, ExportVar};

/// The archive's file name inside its key directory.
pub const ARCHIVE_NAME: &str = "cache.zip";
/// The job variable naming a last-resort key to restore (GitLab's).
pub const CACHE_FALLBACK_KEY: &str = "CACHE_FALLBACK_KEY";

/// A cache key with the job's variables expanded; `Err` says why it cannot
/// be used (empty, or it would leave its directory).
pub fn resolve_key(raw: &str, exports: &[ExportVar]) -> Result<String, String> {
    let key = shell::expand(raw, exports).trim().to_string();
    if key.is_empty() {
        return Err(format!("cache key `{raw}` is empty once expanded"));
    }
    if key.contains('/') || key.contains('\\') || key == "." || key == ".." {
        return Err(format!(
            "cache key `{key}` cannot contain `/` or `\\` or be `.` or `..`"
        ));
    }
    Ok(key)
}

/// Where the archive of `key` lives for a project.
pub fn archive_path(cache_dir: &Path, project_path: &str, key: &str) -> PathBuf {
    let mut path = cache_dir.to_path_buf();
    let mut any = false;
    for part in project_path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            continue;
        }
        path.push(part);
        any = true;
    }
    if !any {
        path.push("project");
    }
    path.join(key).join(ARCHIVE_NAME)
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub key: String,
    /// The key whose archive was extracted, if any.
    pub matched: Option<String>,
    pub size_bytes: u64,
    pub entries: usize,
    /// Log lines (GitLab-like).
    pub lines: Vec<String>,
}

/// The keys a restore tries, in order, without duplicates or invalid ones.
pub fn restore_candidates(
    entry: &CacheEntry,
    key: &str,
    exports: &[ExportVar],
    fallback_variable: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    let mut keys = vec![key.to_string()];
    let mut warnings = Vec::new();
    let raw = entry
        .fallback_keys
        .iter()
        .map(String::as_str)
        .chain(fallback_variable.filter(|v| !v.trim().is_empty()));
    for fallback in raw {
        match resolve_key(fallback, exports) {
            Ok(k) if !keys.contains(&k) => keys.push(k),
            Ok(_) => {}
            Err(e) => warnings.push(format!("Skipping fallback key: {e}")),
        }
    }
    (keys, warnings)
}

/// Restores the first archive found among `candidates` into `build_dir`.
/// A missing archive is a miss, not an error; an unreadable one is an
/// error.
pub fn restore(
    cache_dir: &Path,
    project_path: &str,
    candidates: &[String],
    build_dir: &Path,
) -> Result<Restored, String> {
    let key = candidates.first().cloned().unwrap_or_default();
    let mut lines = Vec::new();
    for candidate in candidates {
        let path = archive_path(cache_dir, project_path, candidate);
        let Ok(meta) = std::fs::metadata(&path) else {
            lines.push(format!(
                "No cache archive for key {candidate}{}",
                if *candidate == key { "" } else { " (fallback)" }
            ));
            continue;
        };
        lines.push(format!("Checking cache for {candidate}..."));
        let entries = archive::extract_zip(&path, build_dir)
            .map_err(|e| format!("cannot extract the cache archive of key `{candidate}`: {e}"))?;
        lines.push(format!(
            "Successfully extracted cache ({entries} files and directories, {} bytes)",
            meta.len()
        ));
        return Ok(Restored {
            key,
            matched: Some(candidate.clone()),
            size_bytes: meta.len(),
            entries,
            lines,
        });
    }
    lines.push("Cache not found: nothing restored".to_string());
    Ok(Restored {
        key,
        matched: None,
        size_bytes: 0,
        entries: 0,
        lines,
    })
}

/// What archiving did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// 0 when nothing matched (no archive written).
    pub size_bytes: u64,
    pub entries: usize,
    pub lines: Vec<String>,
}

/// Archives the entry's paths under `key`.
pub fn archive(
    cache_dir: &Path,
    project_path: &str,
    key: &str,
    entry: &CacheEntry,
    build_dir: &Path,
) -> Result<Archived, String> {
    let selection = archive::select(build_dir, &entry.paths, &[], entry.untracked);
    let mut lines: Vec<String> = selection
        .warnings
        .iter()
        .map(|w| format!("WARNING: {w}"))
        .collect();
    if selection.is_empty() {
        lines.push(format!(
            "No files to cache for key {key}: archive not created"
        ));
        return Ok(Archived {
            size_bytes: 0,
            entries: 0,
            lines,
        });
    }
    let target = archive_path(cache_dir, project_path, key);
    let dir = target.parent().expect("archive paths have a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the cache directory `{}`: {e}", dir.display()))?;
    let temporary = dir.join(format!(".{ARCHIVE_NAME}.{}.tmp", std::process::id()));
    let written = archive::write_zip(build_dir, &selection, &temporary)
        .and_then(|size| std::fs::rename(&temporary, &target).map(|()| size));
    let size = match written {
        Ok(size) => size,
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(format!(
                "cannot write the cache archive of key `{key}`: {e}"
            ));
        }
    };
    lines.push(format!(
        "Created cache for key {key} ({} files and directories, {size} bytes)",
        selection.count()
    ));
    Ok(Archived {
        size_bytes: size,
        entries: selection.count(),
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(key: &str, value: &str) -> ExportVar {
        ExportVar {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn keys() {
        let exports = [var("CI_COMMIT_REF_SLUG", "main"), var("EMPTY", "")];
        let check = |raw: &str, expected: Result<&str, &str>| {
            assert_eq!(
                resolve_key(raw, &exports),
                expected.map(String::from).map_err(String::from),
                "{raw}"
            );
        };
        check("deps-$CI_COMMIT_REF_SLUG", Ok("deps-main"));
        check(" plain ", Ok("plain"));
        check("$EMPTY", Err("cache key `$EMPTY` is empty once expanded"));
        check(
            "a/b",
            Err("cache key `a/b` cannot contain `/` or `\\` or be `.` or `..`"),
        );
        check(
            "..",
            Err("cache key `..` cannot contain `/` or `\\` or be `.` or `..`"),
        );
    }

    #[test]
    fn candidates_keep_order_and_skip_duplicates() {
        let entry = CacheEntry {
            fallback_keys: vec!["main-$X".into(), "k".into(), "bad/key".into()],
            ..Default::default()
        };
        let (keys, warnings) = restore_candidates(&entry, "k", &[var("X", "1")], Some("last"));
        assert_eq!(keys, vec!["k", "main-1", "last"]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn archive_then_restore_by_fallback() {
        let cache = tempfile::tempdir().unwrap();
        let build = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(build.path().join("vendor")).unwrap();
        std::fs::write(build.path().join("vendor/lib.txt"), "cached").unwrap();
        let entry = CacheEntry {
            key: "main".into(),
            paths: vec!["vendor".into()],
            ..Default::default()
        };
        let archived = archive(cache.path(), "g/p", "main", &entry, build.path()).unwrap();
        assert_eq!(archived.entries, 2);
        assert!(archived.size_bytes > 0);
        assert!(cache.path().join("g/p/main/cache.zip").is_file());

        let fresh = tempfile::tempdir().unwrap();
        let restored = restore(
            cache.path(),
            "g/p",
            &["feature".to_string(), "main".to_string()],
            fresh.path(),
        )
        .unwrap();
        assert_eq!(restored.key, "feature");
        assert_eq!(restored.matched.as_deref(), Some("main"));
        assert_eq!(restored.size_bytes, archived.size_bytes);
        assert_eq!(
            std::fs::read_to_string(fresh.path().join("vendor/lib.txt")).unwrap(),
            "cached"
        );

        let miss = restore(cache.path(), "g/other", &["main".to_string()], fresh.path()).unwrap();
        assert_eq!(miss.matched, None);

        let empty = CacheEntry {
            paths: vec!["nothing".into()],
            ..Default::default()
        };
        let none = archive(cache.path(), "g/p", "empty", &empty, build.path()).unwrap();
        assert_eq!(none.entries, 0);
        assert!(!cache.path().join("g/p/empty/cache.zip").exists());
    }
}
