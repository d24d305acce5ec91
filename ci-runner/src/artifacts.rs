//! Job artifacts: the files `artifacts:paths` (and `untracked`, minus
//! `exclude`) select, archived (zip for `archive`, gzip members for reports)
//! and uploaded with `POST /api/v4/jobs/:id/artifacts`, as GitLab Runner's
//! `artifacts-uploader` does.
//!
//! Retries: network errors, 5xx and 429, three attempts with a short
//! backoff, or after GitLab's `Retry-After`. A 4xx other than 429 is permanent. An upload that fails fails
//! the job when the job had succeeded (as in GitLab Runner, where the upload
//! is a build stage like the others).

use std::path::Path;
use std::time::Duration;

use super::api::{ApiError, ArtifactUpload, GitLabClient};
use super::archive;
use super::payload::ArtifactEntry;
use super::shell::{self, ExportVar};

/// Upload attempts for one archive.
pub const UPLOAD_ATTEMPTS: u32 = 3;

/// A prepared archive, ready to upload.
#[derive(Debug)]
pub struct Prepared {
    /// The artifact's name (`artifacts:name`, expanded, or `artifacts`).
    pub name: String,
    pub upload: ArtifactUpload,
    pub entries: usize,
    pub lines: Vec<String>,
}

/// What preparing gave: an archive, or nothing to upload (with why).
#[derive(Debug)]
pub enum Preparation {
    Ready(Prepared),
    Nothing { name: String, lines: Vec<String> },
}

/// `artifacts:name` expanded, or GitLab's default `artifacts`.
pub fn artifact_name(entry: &ArtifactEntry, exports: &[ExportVar]) -> String {
    let name = shell::expand(&entry.name, exports).trim().to_string();
    if name.is_empty() {
        "artifacts".to_string()
    } else {
        name
    }
}

/// Selects and archives the entry's files under `build_dir`, writing the
/// archive in `tmp_dir`. Blocking.
pub fn prepare(
    entry: &ArtifactEntry,
    exports: &[ExportVar],
    build_dir: &Path,
    tmp_dir: &Path,
) -> Result<Preparation, String> {
    let name = artifact_name(entry, exports);
    let selection = archive::select(build_dir, &entry.paths, &entry.exclude, entry.untracked);
    let mut lines: Vec<String> = selection
        .warnings
        .iter()
        .map(|w| format!("WARNING: {w}"))
        .collect();
    if selection.is_empty() {
        lines.push("ERROR: No files to upload".to_string());
        return Ok(Preparation::Nothing { name, lines });
    }
    let (extension, gzip) = match entry.artifact_format.as_str() {
        "gzip" => ("gz", true),
        "zip" => ("zip", false),
        other => {
            return Err(format!(
                "artifact format `{other}` is not supported by this runner (zip and gzip are)"
            ))
        }
    };
    let file_name = match entry.artifact_type.as_str() {
        "archive" => format!("{name}.{extension}"),
        kind => format!("{kind}.{extension}"),
    };
    std::fs::create_dir_all(tmp_dir)
        .map_err(|e| format!("cannot create `{}`: {e}", tmp_dir.display()))?;
    let target = tmp_dir.join(format!("artifact-{}.{extension}", entry.artifact_type));
    let written = if gzip {
        archive::write_gzip(build_dir, &selection, &target)
    } else {
        archive::write_zip(build_dir, &selection, &target)
    };
    let data = written
        .and_then(|_| std::fs::read(&target))
        .map_err(|e| format!("cannot archive the artifacts: {e}"))?;
    let _ = std::fs::remove_file(&target);
    lines.push(format!(
        "{}: found {} matching artifact files and directories",
        entry.artifact_type,
        selection.count()
    ));
    Ok(Preparation::Ready(Prepared {
        name,
        upload: ArtifactUpload {
            file_name,
            artifact_type: entry.artifact_type.clone(),
            artifact_format: entry.artifact_format.clone(),
            expire_in: entry.expire_in.clone(),
            data: data.into(),
        },
        entries: selection.count(),
        lines,
    }))
}

/// Uploads with retries; `Ok` with the log line, `Err` with why it failed.
pub async fn upload(
    client: &GitLabClient,
    job_id: i64,
    job_token: &str,
    upload: &ArtifactUpload,
) -> Result<String, String> {
    let mut delay = Duration::from_millis(500);
    let mut last = String::new();
    for attempt in 1..=UPLOAD_ATTEMPTS {
        let retry_after;
        match client.upload_artifacts(job_id, job_token, upload).await {
            Ok(201) | Ok(200) => {
                return Ok(format!(
                    "Uploading artifacts as \"{}\" to coordinator... 201 Created  id={job_id} responseStatus=201 Created",
                    upload.artifact_format
                ))
            }
            Ok(status) => {
                return Err(format!(
                    "Uploading artifacts failed: the job API answered {status}"
                ))
            }
            Err(e) => {
                last = match &e {
                    ApiError::Status(status) | ApiError::RetryAfter(status, _) => {
                        format!("the job API answered {status}")
                    }
                    other => other.to_string(),
                };
                retry_after = e.retry_after();
            }
        }
        if attempt < UPLOAD_ATTEMPTS {
            tokio::time::sleep(retry_after.unwrap_or(delay)).await;
            delay *= 2;
        }
    }
    Err(format!(
        "Uploading artifacts failed after {UPLOAD_ATTEMPTS} attempts: {last}"
    ))
}
