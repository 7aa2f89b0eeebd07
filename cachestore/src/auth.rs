//! Registry credentials where Docker keeps them: `$DOCKER_CONFIG/config.json`
//! (default `~/.docker/config.json`, and Kaniko's `/kaniko/.docker`), with
//! `auths`, `credHelpers` and `credsStore` (the `docker-credential-<name>
//! get` protocol). No credentials found means anonymous access.
//! Secrets never enter an error message.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::error::{CacheStoreError, Cause, RegistryFailure, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// What a credential helper prints for `get`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// The config file to read: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`, else Kaniko's `/kaniko/.docker/config.json`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json"));
    let kaniko = PathBuf::from("/kaniko/.docker/config.json");
    home.filter(|p| p.exists())
        .or_else(|| kaniko.exists().then_some(kaniko))
}

/// `https://index.docker.io/v1/` → `index.docker.io`; Docker Hub's
/// aliases all become `docker.io`. Credentials, mirrors and
/// `--registry-map` all name registries this way.
pub fn normalize(server: &str) -> String {
    let host = server
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// The server name a credential helper expects for `registry`.
fn helper_server(registry: &str) -> String {
    match normalize(registry).as_str() {
        "docker.io" => "https://index.docker.io/v1/".into(),
        host => host.to_string(),
    }
}

fn config_error(path: &Path, cause: impl Into<Cause>) -> CacheStoreError {
    CacheStoreError::Malformed {
        what: path.display().to_string(),
        source: cause.into(),
    }
}

/// Why a credential helper gave no credentials.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{program} get failed ({status})")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
    },
    /// serde's error is left out: the answer holds the secret.
    #[error("{program} get printed no Username/Secret JSON")]
    NoCredentials { program: String },
}

/// Credentials for `registry` (`host[:port]`) from the Docker config.
pub fn credentials_for(registry: &str) -> Result<RegistryAuth> {
    match config_path() {
        Some(path) if path.exists() => credentials_in(&path, registry),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

pub fn credentials_in(path: &Path, registry: &str) -> Result<RegistryAuth> {
    let text = std::fs::read(path).map_err(|e| config_error(path, e))?;
    // serde's message names the position, never the value.
    let config: DockerConfig = serde_json::from_slice(&text).map_err(|e| config_error(path, e))?;
    let wanted = normalize(registry);
    let helper = config
        .cred_helpers
        .iter()
        .find(|(server, _)| normalize(server) == wanted)
        .map(|(_, helper)| helper.clone());
    if let Some(helper) = helper {
        return from_helper(&helper, registry);
    }
    if let Some((_, entry)) = config.auths.iter().find(|(s, _)| normalize(s) == wanted) {
        if let Some(token) = &entry.identitytoken {
            return Ok(RegistryAuth::Bearer(token.clone()));
        }
        if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
            return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
        }
        if let Some(auth) = &entry.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| config_error(path, format!("auths.{wanted}.auth is not base64")))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| config_error(path, format!("auths.{wanted}.auth is not UTF-8")))?;
            let (user, password) = decoded.split_once(':').ok_or_else(|| {
                config_error(path, format!("auths.{wanted}.auth is not user:password"))
            })?;
            return Ok(RegistryAuth::Basic(user.into(), password.into()));
        }
    }
    match config.creds_store {
        Some(store) if !store.is_empty() => from_helper(&store, registry),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// Asks `docker-credential-<helper> get`; "credentials not found" is
/// anonymous access, as with Docker.
fn from_helper(helper: &str, registry: &str) -> Result<RegistryAuth> {
    let program = format!("docker-credential-{helper}");
    let failed = |cause: HelperError| CacheStoreError::Registry {
        registry: registry.to_string(),
        operation: "get credentials",
        reference: program.clone(),
        source: Box::new(cause),
        failure: RegistryFailure::Permanent,
        retry_after: None,
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| {
            failed(HelperError::Spawn {
                program: program.clone(),
                source,
            })
        })?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(helper_server(registry).as_bytes())
        .map_err(|e| failed(e.into()))?;
    let out = child.wait_with_output().map_err(|e| failed(e.into()))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if said.to_ascii_lowercase().contains("credentials not found") {
            return Ok(RegistryAuth::Anonymous);
        }
        return Err(failed(HelperError::Failed {
            program: program.clone(),
            status: out.status,
        }));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout).map_err(|_| {
        failed(HelperError::NoCredentials {
            program: program.clone(),
        })
    })?;
    Ok(match answer.username.as_str() {
        "<token>" => RegistryAuth::Bearer(answer.secret),
        _ => RegistryAuth::Basic(answer.username, answer.secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        (dir, path)
    }

    fn basic(auth: RegistryAuth) -> (String, String) {
        match auth {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("expected basic auth, got {other:?}"),
        }
    }

    #[test]
    fn auths_in_every_form() {
        let (_d, path) = config(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
                "reg.example.com:5000": {"username": "u", "password": "p"},
                "http://tokens.example.com": {"identitytoken": "tok"}
            }}"#,
        );
        assert_eq!(
            basic(credentials_in(&path, "docker.io").unwrap()),
            ("hub".into(), "secret".into())
        );
        assert_eq!(
            basic(credentials_in(&path, "reg.example.com:5000").unwrap()),
            ("u".into(), "p".into())
        );
        assert!(
            matches!(credentials_in(&path, "tokens.example.com").unwrap(), RegistryAuth::Bearer(t) if t == "tok")
        );
        assert!(matches!(
            credentials_in(&path, "other.example.com").unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn bad_configs_name_the_file_but_not_the_secret() {
        let (_d, path) = config(r#"{"auths": {"r.example.com": {"auth": "not base64 s3cret!"}}}"#);
        let err = credentials_in(&path, "r.example.com")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("not base64"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let (_d, path) = config("{not json");
        assert!(credentials_in(&path, "r.example.com").is_err());
    }

    #[test]
    fn missing_helpers_fail_clearly() {
        let (_d, path) = config(r#"{"credHelpers": {"r.example.com": "kiln-test-absent"}}"#);
        let err = credentials_in(&path, "r.example.com")
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker-credential-kiln-test-absent"), "{err}");
    }
}
