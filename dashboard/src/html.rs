//! HTML building blocks: escaping, the page layout, and formatting of sizes, durations and
//! times for people. Everything that comes from jobs, agents or files goes through [`esc`].

use std::fmt::{self, Write as _};

use copilot_protocol::JobState;

/// Text escaped for HTML element content and quoted attribute values.
#[derive(Debug, Clone, Copy)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// Shorthand for [`Esc`].
pub fn esc(s: &str) -> Esc<'_> {
    Esc(s)
}

/// A path segment or query value percent-encoded (everything but unreserved characters).
pub fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A file path inside an archive as URL path segments: each segment encoded, `/` kept.
pub fn url_path(path: &str) -> String {
    path.split('/').map(url_part).collect::<Vec<_>>().join("/")
}

/// Which navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Work,
    Fleet,
    Contributions,
    /// The login page: no navigation.
    None,
}

/// A rendered page: its title and the contents of `<main>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub title: String,
    pub nav: Nav,
    pub body: String,
}

/// Where the dashboard lives on the manager.
pub const BASE: &str = "/ui";

/// The whole document around a page: head, navigation, live-update indicator, and `<main>`.
/// `stamp` names the state of jobs and agents the page shows (see `assets/app.js`).
pub fn document(page: &Page, stamp: &str) -> String {
    let mut s = String::with_capacity(page.body.len() + 2048);
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · copilot</title>\
         <link rel=\"stylesheet\" href=\"{BASE}/assets/style.css\">\
         <script src=\"{BASE}/assets/app.js\" defer></script></head>\n<body data-stamp=\"{stamp}\">\
         <header><a class=\"brand\" href=\"{BASE}/\">copilot</a><nav>",
        title = esc(&page.title),
        stamp = esc(stamp)
    );
    if page.nav != Nav::None {
        for (nav, href, label) in [
            (Nav::Work, "/", "Work"),
            (Nav::Fleet, "/fleet", "Fleet"),
            (Nav::Contributions, "/contributions", "Contributions"),
        ] {
            let class = if nav == page.nav {
                " class=\"active\""
            } else {
                ""
            };
            let _ = write!(s, "<a href=\"{BASE}{href}\"{class}>{label}</a>");
        }
        s.push_str(
            "</nav><span id=\"live\" class=\"live\" title=\"pages update by themselves while this is green\">live</span>",
        );
    } else {
        s.push_str("</nav>");
    }
    let _ = write!(
        s,
        "</header>\n<main id=\"main\">{}</main>\n<footer>copilot {} · <a href=\"/metrics\">metrics</a> · \
         <a href=\"{BASE}/logout\">log out</a></footer>\n</body></html>\n",
        page.body,
        env!("CARGO_PKG_VERSION")
    );
    s
}

/// A state as a coloured badge.
pub fn state_badge(s: JobState) -> String {
    format!("<span class=\"badge st-{s}\">{s}</span>")
}

/// `1.5 KiB`, `12 B`, `3.0 GiB`.
pub fn bytes(n: u64) -> String {
    copilot_protocol::units::Bytes(n).to_string()
}

/// `850 ms`, `12.3 s`, `4 min 10 s`, `2 h 05 min`, `3 d 4 h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// Seconds as a duration for people (CPU or run time totals).
pub fn seconds(s: f64) -> String {
    if !s.is_finite() || s <= 0.0 {
        return "0 s".into();
    }
    duration_ms((s * 1000.0).round() as u64)
}

/// Unix milliseconds as `2026-12-04 21:41:40 UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The date `days` after 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's method:
/// count in 400-year eras of 146097 days, years starting in March).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// `12s ago` etc. with the exact UTC time as a tooltip.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "-".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    let text = match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    };
    format!("<time title=\"{}\">{text}</time>", utc(then_ms))
}

/// A table: header cells (already HTML) and rows of cells (already HTML).
pub fn table(class: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("<table class=\"{class}\"><thead><tr>");
    for h in header {
        let _ = write!(s, "<th>{h}</th>");
    }
    s.push_str("</tr></thead><tbody>");
    for row in rows {
        s.push_str("<tr>");
        for cell in row {
            let _ = write!(s, "<td>{cell}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// A paragraph saying there is nothing to show.
pub fn empty(text: &str) -> String {
    format!("<p class=\"empty\">{}</p>", esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">Tom & 'Jerry'</a>").to_string(),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("plain é").to_string(), "plain é");
        assert_eq!(url_part("a b/c#d"), "a%20b%2Fc%23d");
        assert_eq!(url_path("out/h 1.csv"), "out/h%201.csv");
    }

    #[test]
    fn sizes_durations_and_dates_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(12_340), "12.3 s");
        assert_eq!(duration_ms(250_000), "4 min 10 s");
        assert_eq!(duration_ms(7_500_000), "2 h 05 min");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3 d 4 h");
        assert_eq!(seconds(f64::NAN), "0 s");
        assert_eq!(seconds(1.5), "1.5 s");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_761_599_000), "2026-12-31 23:59:59 UTC");
        assert!(ago(61_000, 1_000).contains(">1m ago<"));
        assert_eq!(ago(5, 0), "-");
    }

    #[test]
    fn the_document_escapes_the_title_and_marks_the_page() {
        let d = document(
            &Page {
                title: "<job>".into(),
                nav: Nav::Fleet,
                body: "<p>x</p>".into(),
            },
            "7-x",
        );
        assert!(d.contains("<body data-stamp=\"7-x\">"));
        assert!(d.contains("<title>&lt;job&gt; · copilot</title>"));
        assert!(d.contains("<a href=\"/ui/fleet\" class=\"active\">Fleet</a>"));
        assert!(d.contains("<main id=\"main\"><p>x</p></main>"));
        assert!(d.contains("id=\"live\""));
        let login = document(
            &Page {
                title: "log in".into(),
                nav: Nav::None,
                body: String::new(),
            },
            "",
        );
        assert!(!login.contains("id=\"live\""));
    }
}
