//! [`ProjectCa`]: a private certificate authority for one stack and a server certificate it
//! signed, made with the `openssl` command: what a project admin makes once for the project's
//! XMPP server (docs/SECURITY.md gives the same commands). Clients pin the CA; the server
//! presents the leaf (CA:FALSE, subjectAltName = the XMPP domain; rustls refuses a self-signed
//! CA used as the server's own certificate).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::io;
use crate::{require_tool, StackError};

/// Days the certificates are valid: a test stack lives minutes, `copilot up`'s state dir years.
const DAYS: &str = "3650";
/// A new P-256 key, unencrypted.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA certificate and a server key pair it certified, as files in one directory.
#[derive(Debug, Clone)]
pub struct ProjectCa {
    dir: PathBuf,
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

impl ProjectCa {
    /// The CA and a certificate for the names `hosts` in `dir` (`ca.pem`, `<first host>.crt`,
    /// `<first host>.key`): made if missing, else reused (a stack's state dir keeps its CA
    /// across restarts).
    pub fn create_or_reuse(dir: &Path, hosts: &[&str]) -> Result<ProjectCa, StackError> {
        let ca_pem = dir.join("ca.pem");
        if !ca_pem.is_file() || !dir.join("ca.key").is_file() {
            require_tool("openssl", "openssl")?;
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            openssl(
                Command::new("openssl")
                    .args(["req", "-x509"])
                    .args(EC_KEY)
                    .arg("-keyout")
                    .arg(dir.join("ca.key"))
                    .arg("-out")
                    .arg(&ca_pem)
                    .args(["-days", DAYS, "-subj", "/CN=copilot project CA"])
                    .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                    .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
                "making the CA",
            )?;
        }
        let ca_text = std::fs::read_to_string(&ca_pem)
            .map_err(io(format!("reading {}", ca_pem.display())))?;
        let mut ca = ProjectCa {
            dir: dir.to_owned(),
            ca_pem: ca_text,
            cert: PathBuf::new(),
            key: PathBuf::new(),
        };
        let san: Vec<String> = hosts.iter().map(|h| format!("DNS:{h}")).collect();
        (ca.cert, ca.key) = ca.leaf(hosts.first().copied().unwrap_or("server"), &san.join(","))?;
        Ok(ca)
    }

    /// A server certificate `<name>.crt` (and its key `<name>.key`) signed by this CA for the
    /// subjectAltNames `san` (e.g. `DNS:localhost,IP:127.0.0.1`): made if missing, else reused.
    pub fn leaf(&self, name: &str, san: &str) -> Result<(PathBuf, PathBuf), StackError> {
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        if cert.is_file() && key.is_file() {
            return Ok((cert, key));
        }
        require_tool("openssl", "openssl")?;
        let csr = self.dir.join(format!("{name}.csr"));
        openssl(
            Command::new("openssl")
                .arg("req")
                .args(EC_KEY)
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr)
                .args(["-subj", &format!("/CN={name}")]),
            "making a server key",
        )?;
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nsubjectAltName={san}\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .map_err(io(format!("writing {}", ext.display())))?;
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(self.dir.join("ca.pem"))
                .arg("-CAkey")
                .arg(self.dir.join("ca.key"))
                .args(["-CAcreateserial", "-days", DAYS, "-extfile"])
                .arg(&ext)
                .arg("-out")
                .arg(&cert),
            "signing a server certificate",
        )?;
        Ok((cert, key))
    }

    /// The CA certificate (PEM), what clients pin.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The first server's certificate (PEM file).
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// The first server's private key (PEM file).
    pub fn key(&self) -> &Path {
        &self.key
    }
}

fn openssl(cmd: &mut Command, what: &str) -> Result<(), StackError> {
    let out = cmd
        .output()
        .map_err(io(format!("running openssl ({what})")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(StackError::Tool {
            what: format!("openssl ({what})"),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_and_a_leaf_for_the_host_are_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ProjectCa::create_or_reuse(dir.path(), &["localhost"]).unwrap();
        assert!(ca.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(ca.cert())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("DNS:localhost"), "{text}");
        assert!(text.contains("CA:FALSE"), "{text}");
        let verify = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.path().join("ca.pem"))
            .arg(ca.cert())
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
        let again = ProjectCa::create_or_reuse(dir.path(), &["localhost"]).unwrap();
        assert_eq!(again.ca_pem(), ca.ca_pem());
        let (http, _) = ca.leaf("http", "DNS:localhost,IP:127.0.0.1").unwrap();
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&http)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("IP Address:127.0.0.1"), "{text}");
    }
}
