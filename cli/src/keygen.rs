//! `copilot keygen`: the project's signing key pair. The manager signs every assignment with
//! the private key (`[trust] signing_key` in manager.toml); agents act only on assignments that
//! verify against the public key (`[trust] manager_key` in agent.toml).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use copilot_protocol::signing::{KeyError, PublicKey, SigningKey};

/// The private key's file name in the output dir.
pub const PRIVATE_KEY_FILE: &str = "manager.key";
/// The public key's file name in the output dir.
pub const PUBLIC_KEY_FILE: &str = "manager.pub";

/// Why no key pair was written.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{0} exists: keep it, or pass --force to replace it (agents that trust the old key will refuse work signed with the new one)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The files written.
#[derive(Debug)]
pub struct KeyPair {
    pub private_key: PathBuf,
    pub public_key_file: PathBuf,
    pub public_key: PublicKey,
}

/// Generate a key pair into `dir` (created if missing): the private key in PKCS#8 PEM, mode
/// 0600, and the public key in base64. Refuses to replace either file unless `force`.
pub fn keygen(dir: &Path, force: bool) -> Result<KeyPair, KeygenError> {
    let private_key = dir.join(PRIVATE_KEY_FILE);
    let public_key_file = dir.join(PUBLIC_KEY_FILE);
    if !force {
        if let Some(there) = [&private_key, &public_key_file]
            .into_iter()
            .find(|p| p.symlink_metadata().is_ok())
        {
            return Err(KeygenError::Exists(there.clone()));
        }
    }
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| KeygenError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let (key, pem) = SigningKey::generate()?;
    let public_key = key.public_key();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&private_key)
        .map_err(write_err(&private_key))?;
    // An existing file (--force) keeps its mode on open: make it private before writing.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write_err(&private_key))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err(&private_key))?;
    std::fs::write(&public_key_file, format!("{public_key}\n"))
        .map_err(write_err(&public_key_file))?;
    Ok(KeyPair {
        private_key,
        public_key_file,
        public_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_private_key_only_its_owner_reads_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let pair = keygen(&keys, false).unwrap();
        let mode = std::fs::metadata(&pair.private_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = std::fs::read_to_string(&pair.private_key).unwrap();
        assert_eq!(
            SigningKey::from_pem(&pem).unwrap().public_key(),
            pair.public_key
        );
        let public = std::fs::read_to_string(&pair.public_key_file).unwrap();
        assert_eq!(public.trim().parse::<PublicKey>().unwrap(), pair.public_key);

        let err = keygen(&keys, false).unwrap_err();
        assert!(matches!(err, KeygenError::Exists(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&pair.private_key).unwrap(), pem);

        std::fs::set_permissions(&pair.private_key, std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let again = keygen(&keys, true).unwrap();
        assert_ne!(again.public_key, pair.public_key);
        let mode = std::fs::metadata(&again.private_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
