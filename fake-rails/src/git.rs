//! The few git commands fake-rails runs against a project's local repository.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::state::CommitInfo;

/// GitLab's "blank" sha, the `before_sha` of pipelines not created by a push.
pub const BLANK_SHA: &str = "0000000000000000000000000000000000000000";

async fn git(repo: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new("git")
        .arg("-c")
        .arg("safe.directory=*")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// A ref name that cannot be taken for an option or walk out of `refs/`.
pub fn valid_ref_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && !name.starts_with('/')
        && !name.contains("..")
        && !name.ends_with(".lock")
        && !name
            .chars()
            .any(|c| c.is_control() || " ~^:?*[\\".contains(c))
}

/// The absolute path of a repository (work tree or bare), or why it is not one.
pub async fn repository_root(path: &Path) -> Result<PathBuf, String> {
    let canonical =
        std::fs::canonicalize(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    git(&canonical, &["rev-parse", "--git-dir"])
        .await
        .map_err(|e| format!("`{}` is not a git repository: {e}", path.display()))?;
    Ok(canonical)
}

/// The branch `HEAD` points at.
pub async fn head_branch(repo: &Path) -> Option<String> {
    git(repo, &["symbolic-ref", "--quiet", "--short", "HEAD"])
        .await
        .ok()
        .map(|s| s.trim().to_string())
}

/// Resolves a branch or tag name: its commit and whether it is a tag.
pub async fn resolve_ref(repo: &Path, git_ref: &str) -> Result<(CommitInfo, bool), String> {
    if !valid_ref_name(git_ref) {
        return Err("Reference not found".to_string());
    }
    let tag = git(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/tags/{git_ref}^{{commit}}"),
        ],
    )
    .await;
    let (sha, is_tag) = match tag {
        Ok(sha) => (sha, true),
        Err(_) => {
            let branch = git(
                repo,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("refs/heads/{git_ref}^{{commit}}"),
                ],
            )
            .await;
            (
                branch.map_err(|_| "Reference not found".to_string())?,
                false,
            )
        }
    };
    let sha = sha.trim().to_string();
    let log = git(
        repo,
        &["log", "-1", "--format=%an%x00%ae%x00%cI%x00%B", &sha],
    )
    .await?;
    let mut parts = log.splitn(4, '\0');
    let author_name = parts.next().unwrap_or_default().to_string();
    let author_email = parts.next().unwrap_or_default().to_string();
    let timestamp = parts.next().unwrap_or_default().to_string();
    let message = parts.next().unwrap_or_default().trim_end().to_string();
    Ok((
        CommitInfo {
            sha,
            before_sha: BLANK_SHA.to_string(),
            message,
            author_name,
            author_email,
            timestamp,
        },
        is_tag,
    ))
}

/// A file's content at a commit, `None` when it does not exist there.
pub async fn show_file(repo: &Path, sha: &str, path: &str) -> Option<String> {
    git(repo, &["show", &format!("{sha}:{path}")]).await.ok()
}

/// The last commit (at or before `sha`) that touched `file`.
pub async fn last_commit_touching(repo: &Path, sha: &str, file: &str) -> Option<String> {
    let out = git(repo, &["log", "-1", "--format=%H", sha, "--", file])
        .await
        .ok()?;
    let out = out.trim();
    (!out.is_empty()).then(|| out.to_string())
}
