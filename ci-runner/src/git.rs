//! `get_sources`: what GitLab Runner's shell does to put the job's commit in
//! the build directory, as a bash script (so a failure is git's own exit
//! code, a `script_failure`, as upstream).
//!
//! Both `clone` and `fetch` run `git init` + `git fetch` of the payload's
//! refspecs + `git checkout -f <sha>` + `git clean` (GitLab Runner's
//! refspec fetch). `clone` starts from an empty directory; `fetch` reuses the
//! previous checkout of the same project when there is one (it is then a
//! real incremental fetch) and is reported as a `clone` when there is none.
//! `none` leaves the directory as it is; `empty` empties it.
//!
//! Variables: `GIT_STRATEGY` (`clone|fetch|none|empty`, default `clone`;
//! GitLab sends the project's setting as this variable), `GIT_DEPTH`
//! (wins over `git_info.depth`; 0 = full history), `GIT_CLEAN_FLAGS`
//! (default `-ffdx`, `none` to skip), `GIT_FETCH_EXTRA_FLAGS` (replaces the
//! default `--prune --quiet`), `GIT_CLONE_EXTRA_FLAGS` (also read for a
//! `--filter=`).

use std::path::Path;

use super::payload::{GitInfo, JobPayload};
use super::shell::shell_quote;
use runner_telemetry::secrets::strip_credentials;

/// `GIT_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Clone,
    Fetch,
    None,
    Empty,
}

impl Strategy {
    pub fn parse(value: &str) -> Result<Strategy, String> {
        match value.trim() {
            "" | "clone" => Ok(Strategy::Clone),
            "fetch" => Ok(Strategy::Fetch),
            "none" => Ok(Strategy::None),
            "empty" => Ok(Strategy::Empty),
            other => Err(format!(
                "unknown GIT_STRATEGY `{other}` (expected clone, fetch, none or empty)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Clone => "clone",
            Strategy::Fetch => "fetch",
            Strategy::None => "none",
            Strategy::Empty => "empty",
        }
    }
}

/// What `get_sources` will do for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub strategy: Strategy,
    /// `clone`, `fetch` or `none`: what happens given the build directory.
    pub operation: &'static str,
    /// 0 = full history.
    pub depth: i64,
    pub filter: Option<String>,
    /// `None` when `GIT_CLEAN_FLAGS` is `none`.
    pub clean_flags: Option<Vec<String>>,
    pub fetch_flags: Vec<String>,
}

/// Decides from the payload and whether `dir` holds an earlier checkout.
pub fn plan(payload: &JobPayload, dir: &Path) -> Result<Plan, String> {
    let strategy = Strategy::parse(payload.variable("GIT_STRATEGY").unwrap_or("clone"))?;
    let depth = payload
        .variable("GIT_DEPTH")
        .and_then(|d| d.trim().parse::<i64>().ok())
        .unwrap_or(payload.git_info.depth)
        .max(0);
    let words = |key: &str| -> Option<Vec<String>> {
        payload
            .variable(key)
            .map(|v| v.split_whitespace().map(String::from).collect())
    };
    let fetch_flags =
        words("GIT_FETCH_EXTRA_FLAGS").unwrap_or_else(|| vec!["--prune".into(), "--quiet".into()]);
    let clone_flags = words("GIT_CLONE_EXTRA_FLAGS").unwrap_or_default();
    let filter = fetch_flags
        .iter()
        .chain(&clone_flags)
        .find_map(|f| f.strip_prefix("--filter="))
        .map(String::from);
    let clean_flags = match words("GIT_CLEAN_FLAGS") {
        Some(flags) if flags.len() == 1 && flags[0] == "none" => None,
        Some(flags) if !flags.is_empty() => Some(flags),
        _ => Some(vec!["-ffdx".to_string()]),
    };
    let has_repo = !payload.git_info.repo_url.is_empty();
    let operation = match strategy {
        Strategy::None | Strategy::Empty => "none",
        _ if !has_repo => "none",
        Strategy::Fetch if dir.join(".git").is_dir() => "fetch",
        Strategy::Fetch | Strategy::Clone => "clone",
    };
    let mut fetch_flags = fetch_flags;
    if operation == "clone" && filter.is_some() {
        // A partial clone needs the filter on the first fetch too.
        for flag in &clone_flags {
            if flag.starts_with("--filter=") && !fetch_flags.contains(flag) {
                fetch_flags.push(flag.clone());
            }
        }
    }
    Ok(Plan {
        strategy,
        operation,
        depth,
        filter,
        clean_flags,
        fetch_flags,
    })
}

/// The script's commands for a `clone` or `fetch` operation (run in the
/// build directory, quietly: the URL may hold the job token).
pub fn commands(plan: &Plan, git: &GitInfo) -> Vec<String> {
    let echo = |text: &str| format!("echo {}", shell_quote(text));
    let mut c = vec!["export GIT_TERMINAL_PROMPT=0".to_string()];
    if plan.operation == "fetch" {
        c.push(echo("Reinitialized existing Git repository"));
        // Lock files a killed job may have left behind.
        c.push(
            "rm -f .git/index.lock .git/shallow.lock .git/HEAD.lock .git/config.lock .git/hooks/post-checkout"
                .into(),
        );
    } else {
        c.push(echo("Created fresh repository."));
        c.push("git -c init.defaultBranch=main init -q".into());
    }
    let url = shell_quote(&git.repo_url);
    c.push(format!(
        "git remote set-url origin {url} 2>/dev/null || git remote add origin {url}"
    ));
    if plan.depth > 0 {
        c.push(echo(&format!(
            "Fetching changes with git depth set to {}...",
            plan.depth
        )));
    } else {
        c.push(echo("Fetching changes..."));
    }
    let mut fetch = String::from("git fetch origin");
    for flag in &plan.fetch_flags {
        fetch.push(' ');
        fetch.push_str(&shell_quote(flag));
    }
    if plan.depth > 0 {
        fetch.push_str(&format!(" --depth {}", plan.depth));
    }
    let refspecs: Vec<String> = if git.refspecs.is_empty() {
        vec![
            "+refs/heads/*:refs/remotes/origin/*".into(),
            "+refs/tags/*:refs/tags/*".into(),
        ]
    } else {
        git.refspecs.clone()
    };
    for refspec in &refspecs {
        fetch.push(' ');
        fetch.push_str(&shell_quote(refspec));
    }
    c.push(fetch);
    let target = if !git.sha.is_empty() {
        git.sha.clone()
    } else if git.ref_type == "tag" {
        format!("refs/tags/{}", git.git_ref)
    } else {
        format!("refs/remotes/origin/{}", git.git_ref)
    };
    let short: String = if git.sha.is_empty() {
        git.git_ref.clone()
    } else {
        git.sha.chars().take(8).collect()
    };
    c.push(echo(&format!(
        "Checking out {short} as detached HEAD (ref is {})...",
        git.git_ref
    )));
    c.push(format!(
        "git -c advice.detachedHead=false checkout -f -q {}",
        shell_quote(&target)
    ));
    if let Some(flags) = &plan.clean_flags {
        let quoted: Vec<String> = flags.iter().map(|f| shell_quote(f)).collect();
        c.push(format!("git clean -q {}", quoted.join(" ")));
    }
    c.push(echo("Skipping Git submodules setup"));
    c
}

/// The log's first line for a repository, credentials stripped.
pub fn describe(git: &GitInfo) -> String {
    format!("Fetching from {}", strip_credentials(&git.repo_url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Variable;

    fn payload(vars: &[(&str, &str)], depth: i64, repo: &str) -> JobPayload {
        JobPayload {
            git_info: GitInfo {
                repo_url: repo.into(),
                depth,
                ..Default::default()
            },
            variables: vars
                .iter()
                .map(|(k, v)| Variable {
                    key: k.to_string(),
                    value: v.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn check(vars: &[(&str, &str)], depth: i64, has_checkout: bool, expected: &str) {
        let dir = tempfile::tempdir().unwrap();
        if has_checkout {
            std::fs::create_dir(dir.path().join(".git")).unwrap();
        }
        let actual = match plan(&payload(vars, depth, "file:///r.git"), dir.path()) {
            Ok(p) => format!(
                "{} op={} depth={} filter={:?} clean={:?} fetch={:?}",
                p.strategy.as_str(),
                p.operation,
                p.depth,
                p.filter,
                p.clean_flags,
                p.fetch_flags
            ),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(
            actual, expected,
            "{vars:?} depth={depth} checkout={has_checkout}"
        );
    }

    #[test]
    fn plans() {
        /// Variables, payload depth, whether a checkout exists, the plan.
        type Case<'a> = (&'a [(&'a str, &'a str)], i64, bool, &'a str);
        let cases: &[Case] = &[
            (
                &[],
                20,
                false,
                r#"clone op=clone depth=20 filter=None clean=Some(["-ffdx"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_DEPTH", "3")],
                20,
                false,
                r#"clone op=clone depth=3 filter=None clean=Some(["-ffdx"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_DEPTH", "0")],
                20,
                false,
                r#"clone op=clone depth=0 filter=None clean=Some(["-ffdx"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_STRATEGY", "fetch")],
                0,
                true,
                r#"fetch op=fetch depth=0 filter=None clean=Some(["-ffdx"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_STRATEGY", "fetch")],
                0,
                false,
                r#"fetch op=clone depth=0 filter=None clean=Some(["-ffdx"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_STRATEGY", "none")],
                0,
                true,
                r#"none op=none depth=0 filter=None clean=Some(["-ffdx"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_STRATEGY", "empty")],
                0,
                true,
                r#"empty op=none depth=0 filter=None clean=Some(["-ffdx"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_CLEAN_FLAGS", "none")],
                1,
                false,
                r#"clone op=clone depth=1 filter=None clean=None fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_CLEAN_FLAGS", "-ffdx -e vendor/")],
                1,
                false,
                r#"clone op=clone depth=1 filter=None clean=Some(["-ffdx", "-e", "vendor/"]) fetch=["--prune", "--quiet"]"#,
            ),
            (
                &[("GIT_CLONE_EXTRA_FLAGS", "--filter=blob:none")],
                0,
                false,
                r#"clone op=clone depth=0 filter=Some("blob:none") clean=Some(["-ffdx"]) fetch=["--prune", "--quiet", "--filter=blob:none"]"#,
            ),
            (
                &[("GIT_FETCH_EXTRA_FLAGS", "--no-tags")],
                0,
                false,
                r#"clone op=clone depth=0 filter=None clean=Some(["-ffdx"]) fetch=["--no-tags"]"#,
            ),
            (
                &[("GIT_STRATEGY", "rsync")],
                0,
                false,
                "error: unknown GIT_STRATEGY `rsync` (expected clone, fetch, none or empty)",
            ),
        ];
        for (vars, depth, has_checkout, expected) in cases {
            check(vars, *depth, *has_checkout, expected);
        }
    }

    #[test]
    fn no_repository_is_no_operation() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&payload(&[], 20, ""), dir.path()).unwrap();
        assert_eq!(p.operation, "none");
    }

    #[test]
    fn commands_fetch_the_refspecs_and_check_out_the_sha() {
        let git = GitInfo {
            repo_url: "https://gitlab-ci-token:secret@host/g/p.git".into(),
            git_ref: "main".into(),
            sha: "0123456789abcdef".into(),
            refspecs: vec!["+refs/heads/main:refs/remotes/origin/main".into()],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let p = plan(
            &payload(&[("GIT_DEPTH", "5")], 0, &git.repo_url),
            dir.path(),
        )
        .unwrap();
        let script = commands(&p, &git).join("\n");
        assert!(
            script.contains("git -c init.defaultBranch=main init -q"),
            "{script}"
        );
        assert!(script.contains("git fetch origin '--prune' '--quiet' --depth 5 '+refs/heads/main:refs/remotes/origin/main'"), "{script}");
        assert!(
            script.contains("checkout -f -q '0123456789abcdef'"),
            "{script}"
        );
        assert!(script.contains("git clean -q '-ffdx'"), "{script}");
        assert!(script.contains("Checking out 01234567 as detached HEAD (ref is main)..."));
        assert_eq!(describe(&git), "Fetching from https://host/g/p.git");
    }
}
