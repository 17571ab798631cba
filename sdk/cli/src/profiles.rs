//! Where the command line keeps its credentials: one file, `profiles.toml`, in the user's config
//! directory (`$PLINTH_CONFIG_DIR`, else `$XDG_CONFIG_HOME/plinth`, else `~/.config/plinth`), readable by
//! the user alone. A profile holds an API base URL and a session token or API key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The API a fresh profile talks to: `make run` on this machine.
pub const DEFAULT_API: &str = "http://127.0.0.1:8080";

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Profile {
    pub api: Option<String>,
    /// A session token (`pls_…`, from `login`) or an API key (`plk_…`).
    pub token: Option<String>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("api", &self.api)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Profiles {
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// The directory the profiles live in.
pub fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PLINTH_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("plinth"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("no home directory: set PLINTH_CONFIG_DIR to where credentials may be kept")?;
    Ok(PathBuf::from(home).join(".config").join("plinth"))
}

/// Creates `dir` (and its parents) readable by the user alone, if it is missing.
fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

fn path() -> Result<PathBuf> {
    Ok(config_dir()?.join("profiles.toml"))
}

impl Profiles {
    /// The stored profiles; none when nothing was stored yet.
    pub fn load() -> Result<Self> {
        let path = path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| {
                format!(
                    "{} is not a valid profiles file; fix or delete it",
                    path.display()
                )
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the profiles, readable and writable by the user alone (they hold credentials): into a
    /// new file of a name nobody could have prepared (created 0600), synced, then moved over the old
    /// one, so a reader sees the old file or the new one, never half of one.
    pub fn save(&self) -> Result<()> {
        let path = path()?;
        let dir = path.parent().context("profiles path has no directory")?;
        create_private_dir(dir)?;
        let text = toml::to_string(self).context("cannot encode the profiles")?;
        let mut file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        {
            use std::io::Write;
            file.write_all(text.as_bytes())?;
            file.as_file().sync_all()?;
        }
        file.persist(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Changes one profile: under an exclusive lock on the profiles (so two commands at once cannot
    /// lose each other's change), reads them as they are now, applies `change`, writes them back.
    pub fn update(name: &str, change: impl FnOnce(&mut Profile)) -> Result<()> {
        let dir = config_dir()?;
        create_private_dir(&dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("profiles.lock"))
            .with_context(|| format!("cannot lock the profiles in {}", dir.display()))?;
        lock.lock()
            .with_context(|| format!("cannot lock the profiles in {}", dir.display()))?;
        let mut profiles = Self::load()?;
        let mut profile = profiles.get(name);
        change(&mut profile);
        profiles.set(name, profile);
        profiles.save()
        // The lock goes with `lock`.
    }

    pub fn get(&self, name: &str) -> Profile {
        self.profiles.get(name).cloned().unwrap_or_default()
    }

    pub fn set(&mut self, name: &str, profile: Profile) {
        self.profiles.insert(name.to_owned(), profile);
    }
}
