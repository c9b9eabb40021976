//! Where the manager is and which token to use: `--manager`/`--token` (or COPILOT_MANAGER /
//! COPILOT_TOKEN) win; otherwise `--stack DIR` (COPILOT_STACK) supplies both from DIR/client.toml,
//! written by `copilot up`; the URL defaults to http://127.0.0.1:8080. For an https:// manager
//! the project CA comes from `--ca FILE` (COPILOT_CA) or the client file's `ca`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The URL used when nothing else says.
pub const DEFAULT_MANAGER: &str = "http://127.0.0.1:8080";
/// The file `copilot up` writes into its state dir.
pub const CLIENT_FILE: &str = "client.toml";

/// DIR/client.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    url: String,
    token: String,
    /// The stack's CA (PEM), for an https:// manager.
    #[serde(default)]
    ca: Option<String>,
}

/// Why the settings could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read {path} (was `copilot up --dir {dir}` started?)")]
    Read {
        path: PathBuf,
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a client file (url, token): {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("cannot read the CA file {path}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no API token: pass --token, set COPILOT_TOKEN, or point --stack/COPILOT_STACK at a `copilot up` dir")]
    NoToken,
}

/// The manager URL and API token to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub url: String,
    pub token: String,
    /// A CA (PEM) to trust beside the public ones.
    pub ca_pem: Option<Vec<u8>>,
}

impl Settings {
    /// Combine flags (already merged with their env variables by clap) and the stack file.
    pub fn resolve(
        manager: Option<&str>,
        token: Option<&str>,
        ca: Option<&Path>,
        stack: Option<&Path>,
    ) -> Result<Settings, SettingsError> {
        let file = stack.map(read_client_file).transpose()?;
        let url = manager
            .map(str::to_owned)
            .or_else(|| file.as_ref().map(|f| f.url.clone()))
            .unwrap_or_else(|| DEFAULT_MANAGER.to_owned());
        let ca_pem = match ca {
            Some(path) => Some(std::fs::read(path).map_err(|source| SettingsError::Ca {
                path: path.to_owned(),
                source,
            })?),
            None => file
                .as_ref()
                .and_then(|f| f.ca.as_ref())
                .map(|pem| pem.as_bytes().to_vec()),
        };
        let token = token
            .map(str::to_owned)
            .or_else(|| file.map(|f| f.token))
            .ok_or(SettingsError::NoToken)?;
        Ok(Settings { url, token, ca_pem })
    }
}

fn read_client_file(dir: &Path) -> Result<ClientFile, SettingsError> {
    let path = dir.join(CLIENT_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::Read {
        path: path.clone(),
        dir: dir.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path,
        reason: e.to_string().trim().replace('\n', " "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_stack_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CLIENT_FILE),
            "url = \"http://127.0.0.1:2\"\ntoken = \"filetok\"\n",
        )
        .unwrap();
        let s = Settings::resolve(None, None, None, Some(dir.path())).unwrap();
        assert_eq!(
            (s.url.as_str(), s.token.as_str()),
            ("http://127.0.0.1:2", "filetok")
        );
        let s = Settings::resolve(Some("http://x:1"), Some("t"), None, Some(dir.path())).unwrap();
        assert_eq!((s.url.as_str(), s.token.as_str()), ("http://x:1", "t"));
        let s = Settings::resolve(None, Some("t"), None, None).unwrap();
        assert_eq!(s.url, DEFAULT_MANAGER);
        assert!(matches!(
            Settings::resolve(None, None, None, None),
            Err(SettingsError::NoToken)
        ));
        assert!(matches!(
            Settings::resolve(None, None, None, Some(&dir.path().join("nope"))),
            Err(SettingsError::Read { .. })
        ));
    }
}
