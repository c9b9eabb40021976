//! The messages on the channels: control messages and heartbeats from the client, and the
//! application's status report to it (formats of `api/boinc_api.cpp` and
//! `client/app_control.cpp`).
//!
//! A message is a flat run of elements, `<tag/>` or `<tag>text</tag>`, optionally separated by
//! white space. Parsing is strict about that shape (anything else is an error naming the byte
//! offset) and bounded by the channel size; tags it does not know are skipped, so a newer client
//! does not break an older application.

use super::channel::MAX_TEXT;

/// Longest tag name accepted.
const MAX_TAG: usize = 64;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("message of {0} bytes is longer than a channel")]
    TooLong(usize),
    #[error("malformed message at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
    #[error("<{tag}> holds {value:?}, not a {expected}")]
    BadValue {
        tag: String,
        value: String,
        expected: &'static str,
    },
}

/// One element of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Element<'a> {
    tag: &'a str,
    /// `None` for `<tag/>`.
    text: Option<&'a str>,
}

/// Split a message into its elements.
fn elements(msg: &str) -> Result<Vec<Element<'_>>, MsgError> {
    if msg.len() > MAX_TEXT {
        return Err(MsgError::TooLong(msg.len()));
    }
    let bad = |at: usize, what| MsgError::Malformed { at, what };
    let b = msg.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() {
            return Ok(out);
        }
        if b[i] != b'<' {
            return Err(bad(i, "text outside an element"));
        }
        let start = i + 1;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if end == start || end - start > MAX_TAG {
            return Err(bad(start, "missing or overlong tag name"));
        }
        // The tag is ASCII, so these are char boundaries.
        let tag = &msg[start..end];
        if b[end..].starts_with(b"/>") {
            out.push(Element { tag, text: None });
            i = end + 2;
        } else if b.get(end) == Some(&b'>') {
            let text_start = end + 1;
            let rest = &msg[text_start..];
            let text_len = rest
                .find('<')
                .ok_or(bad(text_start, "unterminated element"))?;
            let close = text_start + text_len;
            let closing = format!("</{tag}>");
            if !msg[close..].starts_with(&closing) {
                return Err(bad(close, "element not closed by its own end tag"));
            }
            out.push(Element {
                tag,
                text: Some(&msg[text_start..close]),
            });
            i = close + closing.len();
        } else {
            return Err(bad(end, "expected '>' or '/>' after the tag name"));
        }
    }
}

fn number<T: std::str::FromStr>(e: &Element<'_>, expected: &'static str) -> Result<T, MsgError> {
    let text = e.text.unwrap_or("").trim();
    text.parse().map_err(|_| MsgError::BadValue {
        tag: e.tag.to_owned(),
        value: text.chars().take(40).collect(),
        expected,
    })
}

/// A finite number (the client prints them with `%e`).
fn real(e: &Element<'_>) -> Result<f64, MsgError> {
    let v: f64 = number(e, "number")?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(MsgError::BadValue {
            tag: e.tag.to_owned(),
            value: e.text.unwrap_or("").chars().take(40).collect(),
            expected: "finite number",
        })
    }
}

/// A boolean the way the client writes them: `<tag/>`, or `<tag>0|1</tag>`.
fn flag(e: &Element<'_>) -> Result<bool, MsgError> {
    match e.text.map(str::trim) {
        None => Ok(true),
        Some(_) => Ok(number::<i64>(e, "0 or 1")? != 0),
    }
}

/// A request on the process-control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Exit now; the client will restart the task later (from its checkpoint).
    Quit,
    /// Stop computing (the process stays).
    Suspend,
    /// Continue after a suspend.
    Resume,
    /// The task was aborted: exit now, it will never be restarted.
    Abort,
    /// The app version's files changed (e.g. new graphics settings).
    RereadAppInfo,
    /// The network is available again (after the user allowed it).
    NetworkAvailable,
}

/// The requests in one process-control message, in order. Unknown tags are skipped.
pub fn parse_control(msg: &str) -> Result<Vec<Control>, MsgError> {
    Ok(elements(msg)?
        .into_iter()
        .filter_map(|e| match e.tag {
            "quit" => Some(Control::Quit),
            "suspend" => Some(Control::Suspend),
            "resume" => Some(Control::Resume),
            "abort" => Some(Control::Abort),
            "reread_app_info" => Some(Control::RereadAppInfo),
            "network_available" => Some(Control::NetworkAvailable),
            _ => None,
        })
        .collect())
}

/// A message on the heartbeat channel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Heartbeat {
    /// It carried `<heartbeat/>` (the client is alive).
    pub heartbeat: bool,
    /// Working set of the task, bytes, as the client measured it.
    pub wss: Option<f64>,
    /// RAM available to tasks, bytes.
    pub max_wss: Option<f64>,
    /// The client has suspended network activity; absent means it has not.
    pub network_suspended: bool,
    /// Sporadic-app computing state, if the client sent one.
    pub sporadic_ca: Option<i32>,
}

/// Parse a heartbeat-channel message. Unknown tags are skipped.
pub fn parse_heartbeat(msg: &str) -> Result<Heartbeat, MsgError> {
    let mut h = Heartbeat::default();
    for e in elements(msg)? {
        match e.tag {
            "heartbeat" => h.heartbeat = true,
            "wss" => h.wss = Some(real(&e)?),
            "max_wss" => h.max_wss = Some(real(&e)?),
            "network_suspended" => h.network_suspended = flag(&e)?,
            "sporadic_ca" => h.sporadic_ca = Some(number(&e, "integer")?),
            _ => {}
        }
    }
    Ok(h)
}

/// What the application tells the client about itself, about once a second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AppStatus {
    /// CPU seconds used by the task so far, all its runs together.
    pub current_cpu_time: f64,
    /// `current_cpu_time` at the last checkpoint.
    pub checkpoint_cpu_time: f64,
    /// 0..=1, already scaled to the task's fraction_done range; `None` before it is known.
    pub fraction_done: Option<f64>,
    /// Another process whose CPU and memory the client should count as the task's.
    pub other_pid: Option<u32>,
    /// The application needs the network (the client then lets it have it).
    pub want_network: bool,
}

impl AppStatus {
    /// The message text. Numbers are written like the client's own `%e`, and non-finite ones
    /// as 0 (the client would otherwise misparse them); it always fits a channel.
    pub fn to_message(&self) -> String {
        let clean = |v: f64| if v.is_finite() && v >= 0.0 { v } else { 0.0 };
        let mut m = format!(
            "<current_cpu_time>{:e}</current_cpu_time>\n<checkpoint_cpu_time>{:e}</checkpoint_cpu_time>\n<want_network>{}</want_network>\n",
            clean(self.current_cpu_time),
            clean(self.checkpoint_cpu_time),
            u8::from(self.want_network)
        );
        if let Some(f) = self.fraction_done {
            m.push_str(&format!(
                "<fraction_done>{:e}</fraction_done>\n",
                clean(f).min(1.0)
            ));
        }
        if let Some(pid) = self.other_pid {
            m.push_str(&format!("<other_pid>{pid}</other_pid>\n"));
        }
        m
    }

    /// Parse a status message (what the client does with it; used to test the format).
    pub fn parse(msg: &str) -> Result<AppStatus, MsgError> {
        let mut s = AppStatus::default();
        for e in elements(msg)? {
            match e.tag {
                "current_cpu_time" => s.current_cpu_time = real(&e)?,
                "checkpoint_cpu_time" => s.checkpoint_cpu_time = real(&e)?,
                "fraction_done" => s.fraction_done = Some(real(&e)?),
                "other_pid" => s.other_pid = Some(number(&e, "process id")?),
                "want_network" => s.want_network = flag(&e)?,
                _ => {}
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_as_the_client_sends_them() {
        for (text, want) in [
            ("<quit/>", Control::Quit),
            ("<suspend/>", Control::Suspend),
            ("<resume/>", Control::Resume),
            ("<abort/>", Control::Abort),
            ("<reread_app_info/>", Control::RereadAppInfo),
            ("<network_available/>", Control::NetworkAvailable),
        ] {
            assert_eq!(parse_control(text).unwrap(), vec![want], "{text}");
        }
        assert_eq!(
            parse_control(" <suspend/>\n<future_thing>3</future_thing><resume/>").unwrap(),
            vec![Control::Suspend, Control::Resume]
        );
        assert_eq!(parse_control("").unwrap(), vec![]);
    }

    #[test]
    fn heartbeats_as_the_client_sends_them() {
        let h =
            parse_heartbeat("<heartbeat/><wss>1.234560e+06</wss><max_wss>8.000000e+09</max_wss>")
                .unwrap();
        assert!(h.heartbeat && !h.network_suspended);
        assert_eq!(h.wss, Some(1_234_560.0));
        assert_eq!(h.max_wss, Some(8e9));
        let h = parse_heartbeat(
            "<heartbeat/><wss>0.000000e+00</wss><max_wss>1e9</max_wss><network_suspended/><sporadic_ca>2</sporadic_ca>",
        )
        .unwrap();
        assert!(h.network_suspended);
        assert_eq!(h.sporadic_ca, Some(2));
        let h = parse_heartbeat("<network_suspended>0</network_suspended>").unwrap();
        assert!(!h.heartbeat && !h.network_suspended);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "quit",
            "<",
            "<>",
            "<quit",
            "<quit>",
            "<wss>1</max_wss>",
            "<wss>1<x/></wss>",
            "<é/>",
            "<quit/>trailing",
        ] {
            assert!(parse_control(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(
            parse_heartbeat("<wss>lots</wss>"),
            Err(MsgError::BadValue { .. })
        ));
        assert!(parse_heartbeat("<wss>inf</wss>").is_err());
        assert!(matches!(
            parse_control(&"<a/>".repeat(300)),
            Err(MsgError::TooLong(1200))
        ));
        let long_tag = format!("<{}/>", "a".repeat(MAX_TAG + 1));
        assert!(parse_control(&long_tag).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let alphabet = b"<>/_ abqwensd0123.e+-\n\xc3\xa9";
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_control(&text);
            let _ = parse_heartbeat(&text);
            let _ = AppStatus::parse(&text);
        }
    }

    #[test]
    fn status_round_trips_and_fits_a_channel() {
        let s = AppStatus {
            current_cpu_time: 12.5,
            checkpoint_cpu_time: 10.0,
            fraction_done: Some(0.25),
            other_pid: Some(4242),
            want_network: true,
        };
        let m = s.to_message();
        assert!(m.contains("<other_pid>4242</other_pid>"), "{m}");
        assert!(m.contains("<want_network>1</want_network>"), "{m}");
        assert_eq!(AppStatus::parse(&m).unwrap(), s);
        let huge = AppStatus {
            current_cpu_time: f64::MAX,
            checkpoint_cpu_time: f64::NAN,
            fraction_done: Some(7.0),
            other_pid: Some(u32::MAX),
            want_network: false,
        };
        let m = huge.to_message();
        assert!(m.len() <= MAX_TEXT);
        let back = AppStatus::parse(&m).unwrap();
        assert_eq!(back.checkpoint_cpu_time, 0.0);
        assert_eq!(back.fraction_done, Some(1.0));
    }
}
