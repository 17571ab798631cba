//! Files every replica needs (uploaded models and tokenizers, plugin components), named by their
//! SHA-256. With shared storage configured (S3-compatible object storage), each file is published there
//! when it is stored and fetched into a replica's data directory, its hash checked, the first time that
//! replica needs it: the data directory is a cache. Without (the embedded default), the data directory
//! is all there is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("shared storage: {0}")]
    Remote(#[from] object_store::Error),
    #[error("{0}: {1}")]
    Local(PathBuf, std::io::Error),
    #[error("{name} from shared storage has SHA-256 {actual}, not {expected}: refused")]
    Corrupt {
        name: String,
        expected: String,
        actual: String,
    },
}

/// One kind of file (models, or plugin components): a local directory, and where it is shared.
#[derive(Clone)]
pub struct Blobs {
    local: PathBuf,
    shared: Option<(Arc<dyn ObjectStore>, String)>,
    /// Downloads in progress at once: each writes a partial file as large as a model.
    downloads: Arc<tokio::sync::Semaphore>,
}

/// Files one replica downloads from shared storage at once.
const CONCURRENT_DOWNLOADS: usize = 2;

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs")
            .field("local", &self.local)
            .field(
                "shared",
                &self
                    .shared
                    .as_ref()
                    .map(|(store, prefix)| format!("{store}/{prefix}")),
            )
            .finish()
    }
}

impl Blobs {
    /// Files kept in `dir` only.
    #[must_use]
    pub fn local(dir: PathBuf) -> Self {
        Self {
            local: dir,
            shared: None,
            downloads: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_DOWNLOADS)),
        }
    }

    /// Files shared through `store` under `prefix`, cached in `dir`.
    #[must_use]
    pub fn shared(dir: PathBuf, store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        Self {
            local: dir,
            shared: Some((store, prefix.trim_matches('/').to_owned())),
            downloads: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_DOWNLOADS)),
        }
    }

    /// The local directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.local
    }

    /// Where `name` is (or would be) kept locally.
    #[must_use]
    pub fn path(&self, name: &str) -> PathBuf {
        self.local.join(name)
    }

    fn object(prefix: &str, name: &str) -> ObjectPath {
        ObjectPath::from(format!("{prefix}/{name}"))
    }

    /// Sends `name`, already in the local directory, to shared storage (nothing to do without any).
    /// Streams the file, in parts when it is large.
    ///
    /// # Errors
    /// When the file cannot be read or the storage refuses it.
    pub async fn publish(&self, name: &str) -> Result<(), BlobError> {
        let Some((store, prefix)) = &self.shared else {
            return Ok(());
        };
        let path = self.path(name);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|err| BlobError::Local(path.clone(), err))?;
        let mut upload = object_store::buffered::BufWriter::new(store.clone(), Self::object(prefix, name));
        tokio::io::copy(&mut file, &mut upload)
            .await
            .map_err(|err| BlobError::Local(path.clone(), err))?;
        upload
            .shutdown()
            .await
            .map_err(|err| BlobError::Local(path.clone(), err))?;
        Ok(())
    }

    /// Publishes `name` again if shared storage lacks it (a concurrent delete of the same content).
    ///
    /// # Errors
    /// As [`Self::publish`], or when the storage cannot be asked.
    pub async fn ensure_published(&self, name: &str) -> Result<(), BlobError> {
        let Some((store, prefix)) = &self.shared else {
            return Ok(());
        };
        match store.head(&Self::object(prefix, name)).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => self.publish(name).await,
            Err(err) => Err(err.into()),
        }
    }

    /// The local path of `name`, fetched from shared storage when this replica does not have it yet.
    /// A fetched file must hash to `sha256` (its content address), or it is refused and not kept.
    ///
    /// # Errors
    /// When the file is in neither place, cannot be written, or is not what its name says.
    pub async fn fetch(&self, name: &str, sha256: &str) -> Result<PathBuf, BlobError> {
        let path = self.path(name);
        let Some((store, prefix)) = &self.shared else {
            return Ok(path);
        };
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        // A few at a time; whoever waited may find the file fetched meanwhile.
        let _turn =
            self.downloads.acquire().await.map_err(|_| {
                BlobError::Local(path.clone(), std::io::Error::other("the blob store is closed"))
            })?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let local = |err| BlobError::Local(path.clone(), err);
        let partial = self.local.join(format!(".{name}.{}.part", ulid::Ulid::new()));
        let fetched = async {
            let mut stream = store.get(&Self::object(prefix, name)).await?.into_stream();
            let mut file = tokio::fs::File::create(&partial).await.map_err(local)?;
            let mut hash = Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hash.update(&chunk);
                file.write_all(&chunk).await.map_err(local)?;
            }
            file.sync_all().await.map_err(local)?;
            let actual = hex::encode(hash.finalize());
            if actual != sha256 {
                return Err(BlobError::Corrupt {
                    name: name.to_owned(),
                    expected: sha256.to_owned(),
                    actual,
                });
            }
            tokio::fs::rename(&partial, &path).await.map_err(local)?;
            Ok(path.clone())
        }
        .await;
        if fetched.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        fetched
    }

    /// Removes the partial downloads a crash left behind (run before anything fetches).
    pub async fn remove_partial_downloads(&self) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.local).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".part") {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }

    /// Removes `name` from shared storage (the local copy is the caller's to remove).
    ///
    /// # Errors
    /// When the storage refuses; a file already gone is not an error.
    pub async fn remove_shared(&self, name: &str) -> Result<(), BlobError> {
        let Some((store, prefix)) = &self.shared else {
            return Ok(());
        };
        match store.delete(&Self::object(prefix, name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}

/// Connects to the shared storage named by `url` (`s3://bucket/prefix`): credentials and region from
/// `s3`, else from the usual `AWS_*` variables.
///
/// # Errors
/// When the URL is not an `s3://` one or the settings are incomplete.
pub fn connect(url: &str, s3: &S3Settings) -> Result<(Arc<dyn ObjectStore>, String), BlobError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        BlobError::Remote(object_store::Error::Generic {
            store: "S3",
            source: format!("`{url}` is not an s3://bucket/prefix URL").into(),
        })
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(s3.region.clone());
    if let Some(endpoint) = &s3.endpoint {
        builder = builder
            .with_endpoint(endpoint.clone())
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
        builder = builder
            .with_access_key_id(id.clone())
            .with_secret_access_key(secret.clone());
    }
    Ok((Arc::new(builder.build()?), prefix.trim_matches('/').to_owned()))
}

/// How to reach S3-compatible storage.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// Another S3-compatible service (MinIO, Ceph, R2…); unset means AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Two replicas' directories sharing one store (a directory standing in for the bucket).
    fn replicas() -> (tempfile::TempDir, Blobs, Blobs) {
        let root = tempfile::tempdir().unwrap();
        for dir in ["bucket", "a", "b"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
        }
        let bucket: Arc<dyn ObjectStore> = Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(root.path().join("bucket")).unwrap(),
        );
        let a = Blobs::shared(root.path().join("a"), bucket.clone(), "models");
        let b = Blobs::shared(root.path().join("b"), bucket, "models");
        (root, a, b)
    }

    #[tokio::test]
    async fn a_file_published_by_one_replica_is_fetched_by_another_and_checked() {
        let (_root, a, b) = replicas();
        let bytes = b"an onnx graph, say".repeat(1_000);
        let name = format!("{}.onnx", sha(&bytes));
        std::fs::write(a.path(&name), &bytes).unwrap();
        a.publish(&name).await.unwrap();

        let fetched = b.fetch(&name, &sha(&bytes)).await.unwrap();
        assert_eq!(std::fs::read(&fetched).unwrap(), bytes);
        // Cached: no second download needed, even once the shared copy is gone.
        b.remove_shared(&name).await.unwrap();
        assert_eq!(b.fetch(&name, &sha(&bytes)).await.unwrap(), fetched);
        b.remove_shared(&name).await.unwrap();
    }

    #[tokio::test]
    async fn a_file_that_is_not_what_its_name_says_is_refused_and_not_kept() {
        let (_root, a, b) = replicas();
        let name = format!("{}.onnx", sha(b"the original"));
        std::fs::write(a.path(&name), b"tampered with").unwrap();
        a.publish(&name).await.unwrap();
        let refused = b.fetch(&name, &sha(b"the original")).await.unwrap_err();
        assert!(matches!(refused, BlobError::Corrupt { .. }), "{refused}");
        assert!(!b.path(&name).exists());
        assert_eq!(
            std::fs::read_dir(b.dir()).unwrap().count(),
            0,
            "no partial file left"
        );
        assert!(b.fetch("missing.onnx", &sha(b"x")).await.is_err());
    }

    #[tokio::test]
    async fn without_shared_storage_the_directory_is_all_there_is() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::local(dir.path().to_path_buf());
        std::fs::write(blobs.path("x.onnx"), b"x").unwrap();
        blobs.publish("x.onnx").await.unwrap();
        assert_eq!(
            blobs.fetch("x.onnx", "whatever").await.unwrap(),
            blobs.path("x.onnx")
        );
        blobs.remove_shared("x.onnx").await.unwrap();
    }
}
