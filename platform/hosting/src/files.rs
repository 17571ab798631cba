//! Model files: staged on their way in, stored by SHA-256 and published to the replicas' shared
//! storage, and removed once no live version of any tenant uses them.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Hosting, HostingError, Result};

/// A file on its way into the store; it goes with it unless it was moved into the store (a refused
/// upload, or a client that hangs up mid-way, leaves nothing behind).
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    sha256: String,
    size: u64,
}

impl Staged {
    /// A file written to [`Hosting::staging_dir`], with the SHA-256 (hex) and size of what was
    /// written. Dropping it removes the file: only for files staged for an upload.
    #[must_use]
    pub fn written(path: PathBuf, sha256: String, size: u64) -> Self {
        Self { path, sha256, size }
    }

    /// A file about to be written at `path`: removed on drop from the start, so a write cut short
    /// (an error, or a client that hangs up and drops the request) leaves nothing behind.
    #[must_use]
    pub fn begun(path: PathBuf) -> Self {
        Self::written(path, String::new(), 0)
    }

    /// The file is written: what it holds.
    #[must_use]
    pub fn finished(mut self, sha256: String, size: u64) -> Self {
        self.sha256 = sha256;
        self.size = size;
        self
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[must_use]
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether removing unused files removes them from the replicas' shared storage too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shared {
    Remove,
    Keep,
}

impl Hosting {
    /// Stages bytes the platform made (a trained model, its tokenizer).
    ///
    /// # Errors
    /// The disk's.
    pub async fn stage_bytes(&self, bytes: &[u8]) -> Result<Staged> {
        let staging = self.staging_dir();
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(|err| HostingError::internal(err))?;
        let staged = Staged {
            path: staging.join(format!("{}.part", ulid::Ulid::new())),
            sha256: hex::encode(Sha256::digest(bytes)),
            size: bytes.len() as u64,
        };
        tokio::fs::write(&staged.path, bytes)
            .await
            .map_err(|err| HostingError::internal(err))?;
        Ok(staged)
    }

    /// Moves a staged file to its content address (keeping an identical existing file), and publishes
    /// it to the replicas' shared storage before it is registered: once the registry names it, every
    /// replica can fetch it.
    pub(crate) async fn store_file(&self, staged: &Staged, extension: &str) -> Result<PathBuf> {
        let name = format!("{}.{extension}", staged.sha256);
        let target = self.files.path(&name);
        if tokio::fs::try_exists(&target).await.unwrap_or(false) {
            let _ = tokio::fs::remove_file(&staged.path).await;
        } else {
            tokio::fs::rename(&staged.path, &target)
                .await
                .map_err(|err| HostingError::internal(err))?;
        }
        self.files
            .publish(&name)
            .await
            .map_err(|err| HostingError::internal(err))?;
        Ok(target)
    }

    /// Removes whatever the model store holds that no live model version uses: staged parts of
    /// uploads that never finished and files whose registration never happened (a crash, a client
    /// that hung up). Run at start-up, before the server takes requests. (Each replica keeps its own
    /// store.)
    ///
    /// # Errors
    /// When the registry cannot be read.
    pub async fn sweep_files(&self) -> Result<(), plinth_store::StoreError> {
        let _files = self.files_lock.lock().await;
        let _ = tokio::fs::remove_dir_all(self.staging_dir()).await;
        self.remove_local_unused_files().await
    }

    /// Removes this replica's copies of model files no live version uses (the caller holds
    /// `files_lock`).
    pub(crate) async fn remove_local_unused_files(&self) -> Result<(), plinth_store::StoreError> {
        let Ok(mut entries) = tokio::fs::read_dir(self.files.dir()).await else {
            return Ok(());
        };
        let mut unused = Vec::new();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((sha256, "onnx" | "json")) = name.split_once('.') else {
                continue;
            };
            if !self.store.model_file_in_use(sha256).await? {
                unused.push(sha256.to_owned());
            }
        }
        // This replica's copies only: another replica may be about to register a file it published.
        self.remove_unused_files(unused.iter(), Shared::Keep).await;
        Ok(())
    }

    /// Removes the stored files with these hashes that no live model version uses (the caller holds
    /// `files_lock`). A failure is logged: a file left behind costs disk, not correctness.
    pub(crate) async fn remove_unused_files(&self, hashes: impl Iterator<Item = &String>, shared: Shared) {
        for sha256 in hashes {
            match self.store.model_file_in_use(sha256).await {
                Ok(true) => {}
                Ok(false) => {
                    let names = ["onnx", "json"].map(|extension| format!("{sha256}.{extension}"));
                    if shared == Shared::Remove {
                        for name in &names {
                            if let Err(err) = self.files.remove_shared(name).await {
                                tracing::warn!(file = %name, error = %err, "cannot remove a model file from shared storage");
                            }
                        }
                        // Files are shared by content across tenants: an upload of the same bytes
                        // through another replica may have registered meanwhile. Then they go back,
                        // from here.
                        if !matches!(self.store.model_file_in_use(sha256).await, Ok(false)) {
                            for name in &names {
                                if self.files.path(name).exists()
                                    && let Err(err) = self.files.publish(name).await
                                {
                                    tracing::error!(file = %name, error = %err, "cannot restore a model file another upload registered");
                                }
                            }
                            continue;
                        }
                    }
                    for name in &names {
                        let path = self.files.path(name);
                        match tokio::fs::remove_file(&path).await {
                            Ok(()) => {
                                tracing::info!(file = %path.display(), "removed a model file nothing uses");
                            }
                            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                            Err(err) => {
                                tracing::warn!(file = %path.display(), error = %err, "cannot remove a model file");
                            }
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot tell whether a model file is in use; kept"),
            }
        }
    }
}
