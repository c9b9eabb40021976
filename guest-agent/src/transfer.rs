//! The credentials of one job attempt and where they may go. The manager gives each attempt
//! one secret with its upload URL: for `http(s)://` a bearer token, sent only to the origin of
//! the upload URL (never to other input servers; the manager's storage serves inputs to it);
//! for `chirp://` a ticket (its private key in PEM) that may only write the upload, offered for
//! the upload alone: inputs on Chirp are read with the host's own identity.

use copilot_storage::chirp::Ticket;
use copilot_storage::chirp_store::parse_url;
use copilot_storage::{Credential, Url};

use crate::config::TransferSettings;

/// The storage adapters with the agent's transfer settings, trusting `project_ca` (PEM) for
/// HTTPS beside the public CAs.
pub fn transfers(
    settings: &TransferSettings,
    project_ca: Option<Vec<u8>>,
) -> Result<copilot_storage::Transfers, copilot_storage::StorageError> {
    copilot_storage::Transfers::new(copilot_storage::Settings {
        extra_root_pem: project_ca,
        timeout: settings.timeout.as_duration(),
        retry: copilot_storage::Retry {
            retries: settings.retries,
        },
    })
}

/// The origin of an http(s) URL: scheme, host and port (the default port made explicit).
type Origin = (String, String, u16);

fn origin(url: &Url) -> Option<Origin> {
    let scheme = url.scheme();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    Some((
        scheme.to_owned(),
        url.host_str()?.to_owned(),
        url.port_or_known_default()?,
    ))
}

/// What an attempt's secret is, and where it may be shown.
#[derive(Clone)]
enum Secret {
    Bearer { origin: Origin, token: String },
    Ticket { server: String, ticket: Box<Ticket> },
}

/// The credentials of one job attempt.
#[derive(Clone)]
pub struct JobCredentials {
    secret: Secret,
}

impl std::fmt::Debug for JobCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, place) = match &self.secret {
            Secret::Bearer { origin, .. } => (
                "bearer",
                format!("{}://{}:{}", origin.0, origin.1, origin.2),
            ),
            Secret::Ticket { server, .. } => ("ticket", format!("chirp://{server}")),
        };
        f.debug_struct("JobCredentials")
            .field("kind", &kind)
            .field("for", &place)
            .finish_non_exhaustive()
    }
}

impl JobCredentials {
    /// The credentials for an attempt whose outputs go to `upload_url` with `secret`.
    pub fn new(upload_url: &Url, secret: &str) -> Result<JobCredentials, String> {
        let secret = match upload_url.scheme() {
            "chirp" => {
                let (server, _) = parse_url(upload_url).map_err(|e| e.to_string())?;
                let ticket = Ticket::from_pem(secret).map_err(|e| e.to_string())?;
                Secret::Ticket {
                    server,
                    ticket: Box::new(ticket),
                }
            }
            _ => Secret::Bearer {
                origin: origin(upload_url)
                    .ok_or_else(|| format!("upload URL {upload_url} is not http(s) or chirp"))?,
                token: secret.to_owned(),
            },
        };
        Ok(JobCredentials { secret })
    }

    /// What to show the server of input `url`: the bearer token if it is the upload's
    /// origin, else nothing.
    pub fn for_input(&self, url: &Url) -> Credential {
        match &self.secret {
            Secret::Bearer { origin: o, token } if origin(url).as_ref() == Some(o) => {
                Credential::Bearer(token.clone())
            }
            _ => Credential::None,
        }
    }

    /// What to show the server of the upload URL `url`.
    pub fn for_upload(&self, url: &Url) -> Credential {
        match &self.secret {
            Secret::Ticket { server, ticket }
                if parse_url(url).is_ok_and(|(s, _)| &s == server) =>
            {
                Credential::Ticket(ticket.clone())
            }
            _ => self.for_input(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        s.parse().unwrap()
    }

    #[test]
    fn a_token_goes_only_to_its_origin() {
        let t = JobCredentials::new(&url("http://127.0.0.1:8080/outputs/1/1"), "s3cret").unwrap();
        assert!(
            matches!(t.for_input(&url("http://127.0.0.1:8080/inputs/abc")), Credential::Bearer(s) if s == "s3cret")
        );
        for other in [
            "http://127.0.0.1:8081/inputs/abc",
            "https://127.0.0.1:8080/inputs/abc",
            "http://localhost:8080/inputs/abc",
            "http://127.0.0.1.evil.org:8080/x",
            "chirp://127.0.0.1:8080/x",
        ] {
            assert!(
                matches!(t.for_input(&url(other)), Credential::None),
                "{other}"
            );
        }
        assert!(JobCredentials::new(&url("ftp://127.0.0.1:8080/x"), "s3cret").is_err());
        let t = JobCredentials::new(&url("https://example.org/x"), "s3cret").unwrap();
        assert!(matches!(
            t.for_input(&url("https://example.org:443/y")),
            Credential::Bearer(_)
        ));
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn a_ticket_goes_only_to_its_chirp_server_and_only_for_the_upload() {
        let ticket = Ticket::generate().unwrap();
        let pem = ticket.to_pem().unwrap();
        let t = JobCredentials::new(&url("chirp://127.0.0.1:9094/out/job-1/output.tar.gz"), &pem)
            .unwrap();
        let upload = url("chirp://127.0.0.1/out/job-1/output.tar.gz");
        assert!(matches!(t.for_upload(&upload), Credential::Ticket(_)));
        // Inputs are read as the host, never with the upload ticket.
        assert!(matches!(
            t.for_input(&url("chirp://127.0.0.1/in/data")),
            Credential::None
        ));
        assert!(matches!(
            t.for_upload(&url("chirp://127.0.0.2/out/x")),
            Credential::None
        ));
        assert!(matches!(
            t.for_input(&url("http://127.0.0.1:9094/x")),
            Credential::None
        ));
        assert!(!format!("{t:?}").contains("PRIVATE"));
        let err = JobCredentials::new(&url("chirp://127.0.0.1/x"), "not a key").unwrap_err();
        assert!(err.contains("ticket"), "{err}");
    }
}
