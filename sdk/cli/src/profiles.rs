//! Where the command line keeps its credentials: one file, `profiles.toml`, in the user's config
//! directory (`$PLINTH_CONFIG_DIR`, else `$XDG_CONFIG_HOME/plinth`, else `~/.config/plinth`), readable by
//! the user alone. A profile holds an API base URL and a session token or API key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The API a fresh profile talks to: `make run` on this machine.
pub const DEFAULT_API: &str = "http://127.0.0.1:8080";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Profile {
    pub api: Option<String>,
    /// A session token (`pls_…`, from `login`) or an API key (`plk_…`).
    pub token: Option<String>,
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

    /// Writes the profiles, readable and writable by the user alone (they hold credentials).
    pub fn save(&self) -> Result<()> {
        let path = path()?;
        let dir = path.parent().context("profiles path has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let text = toml::to_string(self).context("cannot encode the profiles")?;
        // Written whole next to the old file, then moved over it: never half a file.
        let partial = dir.join("profiles.toml.partial");
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(&partial)
                .with_context(|| format!("cannot write {}", partial.display()))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn get(&self, name: &str) -> Profile {
        self.profiles.get(name).cloned().unwrap_or_default()
    }

    pub fn set(&mut self, name: &str, profile: Profile) {
        self.profiles.insert(name.to_owned(), profile);
    }
}
