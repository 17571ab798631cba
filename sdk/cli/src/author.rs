//! `plugin new` and `plugin build`: a plugin project from the template of its language, and its
//! component built with that language's tool (cargo for wasm32-wasip2, componentize-py,
//! componentize-js). The templates and the WIT world are the ones in the Plinth repository's
//! `plugins/` folder, built into this binary. Building runs the project's code (a build script,
//! Python at build time, the project's own componentize-js): build only projects you trust.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, anyhow};

use crate::{Failure, Outcome};

/// The world every template builds against.
const WIT: &str = include_str!("../../../plugins/wit/0.1.0/plugin.wit");
const WORLD_VERSION: &str = "0.1.0";

const RUST_LIB: &str = include_str!("../../../plugins/templates/rust/src/lib.rs");
const RUST_MANIFEST: &str = include_str!("../../../plugins/templates/rust/plugin.json");
const PYTHON_APP: &str = include_str!("../../../plugins/templates/python/app.py");
const PYTHON_MANIFEST: &str = include_str!("../../../plugins/templates/python/plugin.json");
const JS_APP: &str = include_str!("../../../plugins/templates/js/app.js");
const JS_MANIFEST: &str = include_str!("../../../plugins/templates/js/plugin.json");
const JS_PACKAGE: &str = include_str!("../../../plugins/templates/js/package.json");

/// The languages a plugin can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Language {
    Rust,
    Python,
    Js,
}

/// Whether `name` can name a plugin: lowercase letters, digits and dashes, starting with a letter.
fn valid_name(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

/// A template's manifest (or package.json) with the new plugin's name.
fn renamed(json: &str, name: &str) -> anyhow::Result<String> {
    let mut value: serde_json::Value = serde_json::from_str(json).context("a template's JSON")?;
    value["name"] = serde_json::Value::String(name.to_owned());
    if value.get("version").is_some() {
        value["version"] = serde_json::Value::String("0.1.0".to_owned());
    }
    Ok(serde_json::to_string_pretty(&value)? + "\n")
}

fn cargo_toml(name: &str, sdk: Option<&Path>) -> String {
    let dependency = match sdk {
        Some(path) => format!("plinth-plugin = {{ path = {:?} }}", path.display().to_string()),
        None => "plinth-plugin = \"0.1\"".to_owned(),
    };
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
# The guest SDK: the Plinth repository's plugins/sdk (`plinth-cli plugin new --sdk <path>`).
{dependency}

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# A project of its own, even inside another workspace.
[workspace]
"#
    )
}

fn readme(name: &str, language: Language) -> String {
    let source = match language {
        Language::Rust => "src/lib.rs",
        Language::Python => "app.py",
        Language::Js => "app.js",
    };
    format!(
        "# {name}\n\nA Plinth plugin. The handler is in `{source}`, the manifest (capabilities, models, price) in\n\
         `plugin.json`, the contract with the platform in `wit/plugin.wit`.\n\n\
         ```sh\nplinth-cli plugin build                # -> {name}.wasm\nplinth-cli plugin publish              # the first version opens the listing\n```\n"
    )
}

/// Writes a new plugin project named `name` into `dir` (which must not exist, or be empty).
pub(crate) fn new(name: &str, language: Language, dir: &Path, sdk: Option<&Path>) -> Outcome {
    if !valid_name(name) {
        return Err(Failure::Usage(format!(
            "`{name}` cannot name a plugin: use 2 to 64 lowercase letters, digits and dashes, starting with a letter"
        )));
    }
    if dir.exists()
        && dir
            .read_dir()
            .map_or(true, |mut entries| entries.next().is_some())
    {
        return Err(anyhow!(
            "{} already exists and is not empty; choose another --dir",
            dir.display()
        )
        .into());
    }
    let sdk = match sdk {
        Some(path) => {
            Some(std::path::absolute(path).with_context(|| format!("the SDK path {}", path.display()))?)
        }
        None => None,
    };
    let (manifest, mut files): (&str, Vec<(&str, String)>) = match language {
        Language::Rust => (
            RUST_MANIFEST,
            vec![
                ("Cargo.toml", cargo_toml(name, sdk.as_deref())),
                ("src/lib.rs", RUST_LIB.to_owned()),
                (".gitignore", "/target\n*.wasm\n".to_owned()),
            ],
        ),
        Language::Python => (
            PYTHON_MANIFEST,
            vec![
                ("app.py", PYTHON_APP.to_owned()),
                (".gitignore", "__pycache__/\n*.wasm\n".to_owned()),
            ],
        ),
        Language::Js => (
            JS_MANIFEST,
            vec![
                ("app.js", JS_APP.to_owned()),
                ("package.json", renamed(JS_PACKAGE, name)?),
                (".gitignore", "node_modules/\n*.wasm\n".to_owned()),
            ],
        ),
    };
    files.push(("plugin.json", renamed(manifest, name)?));
    files.push(("wit/plugin.wit", WIT.to_owned()));
    files.push(("README.md", readme(name, language)));
    for (path, contents) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if language == Language::Rust && sdk.is_none() {
        eprintln!(
            "note: Cargo.toml asks crates.io for plinth-plugin; point it at the Plinth repository's plugins/sdk (--sdk) if your registry has none"
        );
    }
    eprintln!(
        "created {} in {}; next: `plinth-cli plugin build --dir {}`",
        name,
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// The language of the project in `dir`, by its files.
fn language_of(dir: &Path) -> Option<Language> {
    if dir.join("Cargo.toml").is_file() {
        Some(Language::Rust)
    } else if dir.join("app.py").is_file() {
        Some(Language::Python)
    } else if dir.join("app.js").is_file() {
        Some(Language::Js)
    } else {
        None
    }
}

/// `program` on PATH, or in `first` when given and there.
fn find_tool(program: &str, first: Option<&Path>) -> Option<PathBuf> {
    if let Some(candidate) = first.map(|dir| dir.join(program))
        && candidate.is_file()
    {
        return Some(candidate);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn run(mut command: Command, what: &str) -> Outcome {
    let status = command.status().with_context(|| format!("cannot start {what}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(anyhow!("{what} failed ({status}); its output above says why").into())
    }
}

/// Whether rustup has the wasm32-wasip2 target installed.
fn rustup_has_wasm() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2")
        })
}

/// Builds a Rust project for wasm32-wasip2: with rustup's target when installed, else with Debian's
/// `rustc-web` toolchain, which builds the standard library for the target itself.
fn build_rust(dir: &Path) -> Result<PathBuf, Failure> {
    let cargo_toml: toml::Value =
        toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).context("cannot read Cargo.toml")?)
            .context("Cargo.toml is not TOML")?;
    let crate_name = cargo_toml
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(toml::Value::as_str)
        .ok_or_else(|| anyhow!("Cargo.toml has no package name"))?
        .replace('-', "_");
    if crate_name.is_empty() || !crate_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(anyhow!("Cargo.toml: `{crate_name}` is not a crate name").into());
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| dir.join("target"), PathBuf::from);
    let target_dir = if target_dir.is_relative() {
        dir.join(target_dir)
    } else {
        target_dir
    };
    let mut command;
    if rustup_has_wasm() {
        command = Command::new("cargo");
        command.args(["build", "--release", "--target", "wasm32-wasip2"]);
    } else if Path::new("/usr/bin/cargo").is_file() && Path::new("/usr/lib/wasm32-wasi").is_dir() {
        command = Command::new("/usr/bin/cargo");
        command
            .args([
                "build",
                "--release",
                "-Zbuild-std=std,panic_abort",
                "--target",
                "wasm32-wasip2",
            ])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env("PATH", "/usr/bin:/bin")
            .env("RUSTC_BOOTSTRAP", "1")
            .env(
                "RUSTFLAGS",
                "-C link-self-contained=no -L native=/usr/lib/wasm32-wasi",
            );
    } else {
        return Err(anyhow!(
            "no Rust toolchain for wasm32-wasip2: run `rustup target add wasm32-wasip2` (or, on Debian, \
             `apt-get install rustc-web cargo-web rust-web-src rust-web-llvm lld-22 wasi-libc`)"
        )
        .into());
    }
    command.current_dir(dir).env("CARGO_TARGET_DIR", &target_dir);
    run(command, "cargo build")?;
    Ok(target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{crate_name}.wasm")))
}

/// Builds the project in `dir` into `<name>.wasm` beside its manifest; returns its path.
pub(crate) fn build(dir: &Path) -> Result<PathBuf, Failure> {
    let manifest = dir.join("plugin.json");
    let name = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(&manifest)
            .with_context(|| format!("no plugin here: cannot read {}", manifest.display()))?,
    )
    .with_context(|| format!("{} is not JSON", manifest.display()))?["name"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} has no name", manifest.display()))?;
    // The output's file name comes from it.
    if !valid_name(&name) {
        return Err(anyhow!(
            "{}: `{name}` cannot name a plugin (lowercase letters, digits and dashes)",
            manifest.display()
        )
        .into());
    }
    let output = dir.join(format!("{name}.wasm"));
    let language = language_of(dir).ok_or_else(|| {
        anyhow!(
            "{} holds no Cargo.toml, app.py or app.js: `plinth-cli plugin new` makes a project",
            dir.display()
        )
    })?;
    let wit = dir.join("wit");
    match language {
        Language::Rust => {
            let built = build_rust(dir)?;
            std::fs::copy(&built, &output)
                .with_context(|| format!("cannot copy {} to {}", built.display(), output.display()))?;
        }
        Language::Python => {
            let tool = find_tool("componentize-py", None).ok_or_else(|| {
                anyhow!("componentize-py is not on PATH: `pip install componentize-py==0.25.*`")
            })?;
            let mut command = Command::new(tool);
            command
                .current_dir(dir)
                .arg("-d")
                .arg(&wit)
                .args(["-w", &format!("plinth:plugin/plugin@{WORLD_VERSION}")])
                .args(["componentize", "app", "-o"])
                .arg(&output);
            run(command, "componentize-py")?;
        }
        Language::Js => {
            let tool =
                find_tool("componentize-js", Some(&dir.join("node_modules/.bin"))).ok_or_else(|| {
                    anyhow!(
                        "componentize-js is not installed: run `npm install` here (it is a dev dependency)"
                    )
                })?;
            let mut command = Command::new(tool);
            command
                .current_dir(dir)
                .arg("app.js")
                .arg("--wit")
                .arg(&wit)
                .args(["--world-name", "plugin", "--disable", "http", "fetch-event", "-o"])
                .arg(&output);
            run(command, "componentize-js")?;
        }
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_are_checked_before_anything_is_written() {
        for good in ["mood", "ticket-triage", "a1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "x", "Mood", "1st", "-x", "x-", "a/b", "../up", "with space"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn every_template_becomes_a_project_named_for_the_plugin() {
        for language in [Language::Rust, Language::Python, Language::Js] {
            let dir = tempfile::tempdir().unwrap();
            let project = dir.path().join("mood");
            new("mood", language, &project, Some(Path::new("/sdk"))).unwrap();
            let manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(project.join("plugin.json")).unwrap()).unwrap();
            assert_eq!(manifest["name"], "mood");
            assert_eq!(manifest["wit_version"], WORLD_VERSION);
            assert!(
                std::fs::read_to_string(project.join("wit/plugin.wit"))
                    .unwrap()
                    .contains("world plugin")
            );
            assert_eq!(language_of(&project), Some(language));
            // Not over an existing project.
            assert!(new("mood", language, &project, None).is_err());
        }
    }
}
