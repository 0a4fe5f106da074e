//! A job's input, resolved to a local file GStreamer can open: a `file://` input must be a non-empty regular file
//! under the input directory (after resolving links); an `http(s)` input is downloaded first ([`crate::fetch`]:
//! address policy, size limit, stall timeout) to `{data}/inputs/{id}`, with the bytes received in the job's status.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kiln_model::vod::{JobInput, JobRequest};

use super::{Jobs, RunError, PROGRESS_POLL};

impl Jobs {
    /// Resolves the input to a local file URI GStreamer can open: files must be under the input directory; URLs
    /// are downloaded first ([`crate::fetch`]: address policy, size limit, stall timeout).
    pub(super) fn input_uri(
        &self,
        id: &str,
        req: &JobRequest,
        cancel: &AtomicBool,
    ) -> Result<String, RunError> {
        match req.parse_input()? {
            JobInput::Url(u) => self.download(id, &u, cancel),
            JobInput::File(p) => Ok(file_uri(&local_input(self.cfg.input_dir.as_deref(), &p)?)),
        }
    }

    /// Downloads `url` for job `id`, recording the bytes received as it goes; returns the file's URI.
    fn download(&self, id: &str, url: &str, cancel: &AtomicBool) -> Result<String, RunError> {
        let dest = self.store.download_path(id);
        let mut last = Instant::now();
        let mut progress = |got: u64, total: Option<u64>| {
            if last.elapsed() >= PROGRESS_POLL || total == Some(got) {
                last = Instant::now();
                self.update(id, |s| {
                    s.input_bytes = Some(got);
                    s.input_total_bytes = total;
                });
            }
        };
        let got = tokio::runtime::Handle::current()
            .block_on(self.fetcher.fetch(url, &dest, cancel, &mut progress))
            .map_err(|e| {
                if cancel.load(Ordering::SeqCst) {
                    RunError::Cancelled
                } else {
                    RunError::Fetch(e)
                }
            })?;
        self.update(id, |s| s.input_bytes = Some(got));
        tracing::info!(bytes = got, "input downloaded");
        Ok(file_uri(&dest))
    }
}

/// The local file a `file://` input names, checked: file inputs enabled, inside the input directory (after
/// resolving links), a non-empty regular file, a UTF-8 path.
fn local_input(input_dir: Option<&Path>, p: &str) -> Result<PathBuf, RunError> {
    let dir = input_dir
        .ok_or(RunError::FileInputsDisabled)?
        .canonicalize()
        .map_err(RunError::InputDir)?;
    let input_file = |source| RunError::InputFile {
        path: p.to_string(),
        source,
    };
    let path = Path::new(p).canonicalize().map_err(input_file)?;
    if !path.starts_with(&dir) {
        return Err(RunError::OutsideInputDir(p.to_string()));
    }
    let meta = std::fs::metadata(&path).map_err(input_file)?;
    if !meta.is_file() {
        return Err(RunError::NotAFile(p.to_string()));
    }
    if meta.len() == 0 {
        return Err(RunError::EmptyInput(p.to_string()));
    }
    path.to_str().ok_or(RunError::NonUtf8Path)?;
    Ok(path)
}

/// `file://` URI of a local path, percent-encoding what a URI cannot carry raw.
fn file_uri(path: &Path) -> String {
    let mut uri = String::from("file://");
    for b in path.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_escape_what_a_uri_cannot_carry() {
        assert_eq!(
            file_uri(Path::new("/media/a b%#é.mp4")),
            "file:///media/a%20b%25%23%C3%A9.mp4"
        );
        assert_eq!(
            file_uri(Path::new("/m/x-1_2.~.mkv")),
            "file:///m/x-1_2.~.mkv"
        );
    }

    #[test]
    fn file_inputs_are_checked_against_the_input_directory() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = dir.path().join("in");
        std::fs::create_dir_all(inputs.join("sub")).unwrap();
        std::fs::write(inputs.join("good.mp4"), b"not empty").unwrap();
        std::fs::write(inputs.join("empty.mp4"), b"").unwrap();
        std::fs::write(dir.path().join("outside.mp4"), b"x").unwrap();
        let check = |p: &Path| local_input(Some(&inputs), p.to_str().unwrap());
        let good = check(&inputs.join("good.mp4")).unwrap();
        assert_eq!(good, inputs.join("good.mp4").canonicalize().unwrap());
        let msg = |r: Result<PathBuf, RunError>| r.unwrap_err().to_string();
        assert!(msg(check(&inputs.join("empty.mp4"))).ends_with("is empty"));
        assert!(msg(check(&inputs.join("sub"))).ends_with("is not a regular file"));
        assert!(msg(check(&inputs.join("missing.mp4"))).contains("No such file"));
        // a link inside the directory that points outside it is outside
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path().join("outside.mp4"), inputs.join("link.mp4"))
            .unwrap();
        #[cfg(unix)]
        assert!(msg(check(&inputs.join("link.mp4"))).ends_with("is outside the input directory"));
        assert!(
            msg(check(&dir.path().join("outside.mp4"))).ends_with("is outside the input directory")
        );
        assert_eq!(
            local_input(None, "/a.mp4").unwrap_err().to_string(),
            "file inputs are disabled: start kilnd with --vod-input-dir"
        );
    }
}
