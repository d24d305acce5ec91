//! Archives of build-directory paths, for the cache and for artifacts: what
//! `paths` (globs, `**` included), `exclude` and `untracked` select, written
//! as a zip file (what GitLab Runner writes for both) or as gzip members
//! (report artifacts), and zip files extracted back.
//!
//! Every selected path stays inside the build directory: a pattern that
//! leaves it (`../x`, an absolute path elsewhere) is refused with a warning,
//! as GitLab Runner does. Symbolic links are archived as links, never
//! followed. All of this is blocking file I/O: callers run it on a blocking
//! thread.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

/// What one archive holds, by path relative to the build directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub entries: BTreeMap<String, EntryKind>,
    /// One line each, for the job log (`path: no matching files`).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink(PathBuf),
}

impl Selection {
    /// Files, directories and links: GitLab's "N files and directories".
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// `path` relative to `root` as a `/`-separated string, if it lies inside.
fn relative(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

/// Normalises a pattern lexically (`a/./b`, `a/../b`); `None` when it leaves
/// the build directory.
fn normalise(root: &Path, pattern: &str) -> Option<String> {
    let path = Path::new(pattern);
    let rel = if path.is_absolute() {
        path.strip_prefix(root).ok()?.to_path_buf()
    } else {
        path.to_path_buf()
    };
    let mut parts: Vec<String> = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// Selects what `paths`, `exclude` and `untracked` name under `root`.
pub fn select(root: &Path, paths: &[String], exclude: &[String], untracked: bool) -> Selection {
    let mut selection = Selection::default();
    for pattern in paths.iter().filter(|p| !p.trim().is_empty()) {
        let Some(normal) = normalise(root, pattern.trim()) else {
            selection
                .warnings
                .push(format!("{pattern}: not in the project directory, ignored"));
            continue;
        };
        let before = selection.entries.len();
        if normal.is_empty() {
            add_tree(root, root, &mut selection);
        } else {
            let full = format!(
                "{}/{normal}",
                glob::Pattern::escape(&root.to_string_lossy())
            );
            match glob::glob_with(&full, MATCH) {
                Ok(matches) => {
                    for path in matches.flatten() {
                        add_tree(root, &path, &mut selection);
                    }
                }
                Err(e) => selection
                    .warnings
                    .push(format!("{pattern}: invalid pattern: {e}")),
            }
        }
        if selection.entries.len() == before {
            selection
                .warnings
                .push(format!("{pattern}: no matching files"));
        }
    }
    if untracked {
        match untracked_files(root) {
            Ok(files) => {
                for file in files {
                    add_tree(root, &root.join(file), &mut selection);
                }
            }
            Err(e) => selection.warnings.push(format!("untracked: {e}")),
        }
    }
    let excludes: Vec<glob::Pattern> = exclude
        .iter()
        .filter_map(|e| normalise(root, e.trim()))
        .filter_map(|e| glob::Pattern::new(&e).ok())
        .collect();
    if !excludes.is_empty() {
        let excluded: Vec<String> = selection
            .entries
            .keys()
            .filter(|rel| {
                // A path goes when it or one of its parent directories
                // matches an exclude pattern.
                let mut prefix = String::new();
                rel.split('/').any(|part| {
                    if !prefix.is_empty() {
                        prefix.push('/');
                    }
                    prefix.push_str(part);
                    excludes.iter().any(|e| e.matches_with(&prefix, MATCH))
                })
            })
            .cloned()
            .collect();
        for rel in excluded {
            selection.entries.remove(&rel);
        }
    }
    selection
}

/// Adds `path` (and, for a directory, everything below it, and its parent
/// directories) to the selection.
fn add_tree(root: &Path, path: &Path, selection: &mut Selection) {
    let Some(rel) = relative(root, path) else {
        return;
    };
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !rel.is_empty() {
        // Parent directories, so that extraction recreates them.
        let parts: Vec<&str> = rel.split('/').collect();
        let mut parent = String::new();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            selection
                .entries
                .entry(parent.clone())
                .or_insert(EntryKind::Dir);
        }
    }
    if meta.file_type().is_symlink() {
        if let Ok(target) = std::fs::read_link(path) {
            selection.entries.insert(rel, EntryKind::Symlink(target));
        }
        return;
    }
    if meta.is_file() {
        selection.entries.insert(rel, EntryKind::File);
        return;
    }
    if !meta.is_dir() {
        return;
    }
    if !rel.is_empty() {
        selection.entries.insert(rel, EntryKind::Dir);
    }
    let Ok(children) = std::fs::read_dir(path) else {
        return;
    };
    for child in children.flatten() {
        add_tree(root, &child.path(), selection);
    }
}

/// Files git does not track (ignored ones included), as GitLab's
/// `untracked: true` has it.
fn untracked_files(root: &Path) -> Result<Vec<String>, String> {
    if !root.join(".git").exists() {
        return Err("the project directory is not a git repository".into());
    }
    let output = std::process::Command::new("git")
        .args(["ls-files", "--others", "-z"])
        .current_dir(root)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output
        .stdout
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect())
}

/// Writes `selection` (under `root`) as a zip file at `target`. Returns its
/// size in bytes.
pub fn write_zip(root: &Path, selection: &Selection, target: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let file = File::create(target)?;
    let mut zip = zip::ZipWriter::new(BufWriter::new(file));
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    let io = |e: zip::result::ZipError| std::io::Error::other(e.to_string());
    for (rel, kind) in &selection.entries {
        let path = root.join(rel);
        match kind {
            EntryKind::Dir => zip.add_directory(format!("{rel}/"), options).map_err(io)?,
            EntryKind::Symlink(target) => zip
                .add_symlink(rel.as_str(), target.to_string_lossy(), options)
                .map_err(io)?,
            EntryKind::File => {
                let meta = std::fs::metadata(&path)?;
                let options = options
                    .unix_permissions(meta.permissions().mode() & 0o7777)
                    .large_file(meta.len() >= u64::from(u32::MAX));
                zip.start_file(rel.as_str(), options).map_err(io)?;
                std::io::copy(&mut File::open(&path)?, &mut zip)?;
            }
        }
    }
    let mut writer = zip.finish().map_err(io)?;
    writer.flush()?;
    drop(writer);
    Ok(std::fs::metadata(target)?.len())
}

/// Writes the selection's files as concatenated gzip members (GitLab's
/// `gzip` artifact format, used by reports), each named after its path.
pub fn write_gzip(root: &Path, selection: &Selection, target: &Path) -> std::io::Result<u64> {
    let mut out = BufWriter::new(File::create(target)?);
    for (rel, kind) in &selection.entries {
        if *kind != EntryKind::File {
            continue;
        }
        let mut encoder = flate2::GzBuilder::new()
            .filename(rel.as_bytes())
            .write(&mut out, flate2::Compression::default());
        std::io::copy(&mut File::open(root.join(rel))?, &mut encoder)?;
        encoder.finish()?;
    }
    out.flush()?;
    drop(out);
    Ok(std::fs::metadata(target)?.len())
}

/// Extracts the zip file at `archive` into `root` (overwriting), refusing
/// entries that would land outside it. Returns the number of entries.
pub fn extract_zip(archive: &Path, root: &Path) -> std::io::Result<usize> {
    let file = File::open(archive)?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| std::io::Error::other(e.to_string()))?;
    let count = zip.len();
    zip.extract(root)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            if let Some(stripped) = f.strip_suffix('/') {
                std::fs::create_dir_all(dir.path().join(stripped)).unwrap();
                continue;
            }
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("content of {f}")).unwrap();
        }
        dir
    }

    fn check(files: &[&str], paths: &[&str], exclude: &[&str], expected: &str) {
        let dir = tree(files);
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let selection = select(dir.path(), &own(paths), &own(exclude), false);
        let mut actual: Vec<String> = selection
            .entries
            .iter()
            .map(|(rel, kind)| match kind {
                EntryKind::Dir => format!("{rel}/"),
                _ => rel.clone(),
            })
            .collect();
        actual.extend(selection.warnings.iter().map(|w| format!("!{w}")));
        assert_eq!(
            actual.join(" "),
            expected,
            "paths={paths:?} exclude={exclude:?}"
        );
    }

    #[test]
    fn selections() {
        let files = [
            "bin/app",
            "bin/lib/x.so",
            "out/a.txt",
            "out/b.log",
            "out/deep/c.txt",
            "top.txt",
            ".hidden/h",
            "empty/",
        ];
        check(&files, &["top.txt"], &[], "top.txt");
        check(&files, &["bin"], &[], "bin/ bin/app bin/lib/ bin/lib/x.so");
        check(&files, &["bin/"], &[], "bin/ bin/app bin/lib/ bin/lib/x.so");
        check(&files, &["out/*.txt"], &[], "out/ out/a.txt");
        check(
            &files,
            &["out/**/*.txt"],
            &[],
            "out/ out/a.txt out/deep/ out/deep/c.txt",
        );
        check(
            &files,
            &["out"],
            &["out/*.log", "out/deep"],
            "out/ out/a.txt",
        );
        check(&files, &["./out/../top.txt"], &[], "top.txt");
        check(&files, &[".hidden"], &[], ".hidden/ .hidden/h");
        check(&files, &["empty"], &[], "empty/");
        check(&files, &["nothing/*"], &[], "!nothing/*: no matching files");
        check(
            &files,
            &["../outside", "/etc/passwd"],
            &[],
            "!../outside: not in the project directory, ignored !/etc/passwd: not in the project directory, ignored",
        );
    }

    #[test]
    fn zip_round_trip_keeps_content_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let src = tree(&["dir/a.txt", "dir/sub/b.txt", "empty/"]);
        let exe = src.path().join("dir/run.sh");
        std::fs::write(&exe, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a.txt", src.path().join("dir/link")).unwrap();
        let selection = select(
            src.path(),
            &["dir".to_string(), "empty".to_string()],
            &[],
            false,
        );
        assert_eq!(selection.count(), 7, "{selection:?}");
        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("a.zip");
        let size = write_zip(src.path(), &selection, &archive).unwrap();
        assert!(size > 0);

        let dest = tempfile::tempdir().unwrap();
        assert_eq!(extract_zip(&archive, dest.path()).unwrap(), 7);
        let read = |p: &str| std::fs::read_to_string(dest.path().join(p)).unwrap();
        assert_eq!(read("dir/a.txt"), "content of dir/a.txt");
        assert_eq!(read("dir/sub/b.txt"), "content of dir/sub/b.txt");
        assert!(dest.path().join("empty").is_dir());
        let mode = std::fs::metadata(dest.path().join("dir/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dest.path().join("dir/link")).unwrap(),
            Path::new("a.txt")
        );
    }

    #[test]
    fn gzip_members_hold_each_file() {
        use std::io::Read;
        let src = tree(&["report.xml"]);
        let selection = select(src.path(), &["report.xml".to_string()], &[], false);
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("r.gz");
        write_gzip(src.path(), &selection, &target).unwrap();
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(File::open(&target).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "content of report.xml");
    }
}
