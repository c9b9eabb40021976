//! copilot's web dashboard as pure rendering: the pages ([`pages`]) and plots ([`plot`]) the
//! manager serves under `/ui`, made from the same API views the CLI reads
//! (`copilot_protocol::api`, `copilot_protocol::summary`), and the two static assets they use.
//! No I/O here: the manager gathers the views, checks the login and serves the bytes
//! (`copilot_manager::web`). Everything a page needs comes from the manager itself: no CDN, no
//! web fonts, no build step.

pub mod html;
pub mod pages;
pub mod plot;

pub use html::{document, Page};

/// The style sheet, served at `/ui/assets/style.css`.
pub const STYLE_CSS: &str = include_str!("../assets/style.css");
/// The script that keeps pages current, served at `/ui/assets/app.js`.
pub const APP_JS: &str = include_str!("../assets/app.js");
