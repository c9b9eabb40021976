//! Plots as inline SVG, drawn on the server: histograms (one or many replicas overlaid, as
//! step lines, or filled) and the activity over time (throughput bars, dispatch rate, queue
//! depth). Colours come from CSS classes (`s0`…`s9`, `done`, `failed`), so the page's style
//! sheet themes them. Pure functions of their input; the numbers they were drawn from are put
//! in `data-` attributes, so tests (and scripts) can check a plot against the API.

use std::fmt::Write as _;

use copilot_protocol::histogram::Bin;
use copilot_protocol::summary::Activity;

use crate::html::esc;

/// Size of every plot's coordinate system (it scales with the page).
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 280.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 34.0;
/// Colour classes `s0`…`s9`.
pub const COLOURS: usize = 10;

/// A linear map from data `lo..hi` to pixels `a..b`.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    a: f64,
    b: f64,
}

impl Axis {
    fn px(&self, v: f64) -> f64 {
        if self.hi <= self.lo {
            return self.a;
        }
        self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)
    }
}

/// A step of 1, 2, 2.5 or 5 times a power of ten giving at most about `max` ticks over `range`.
pub fn nice_step(range: f64, max: usize) -> f64 {
    if !(range.is_finite() && range > 0.0) {
        return 1.0;
    }
    let raw = range / max.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = [1.0, 2.0, 2.5, 5.0]
        .into_iter()
        .find(|n| norm <= *n * (1.0 + 1e-9))
        .unwrap_or(10.0);
    nice * mag
}

/// [`nice_step`] for counts: a whole number, so no tick falls between two counts.
fn count_step(range: f64, max: usize) -> f64 {
    let step = nice_step(range, max).max(1.0);
    if step.fract() == 0.0 {
        step
    } else {
        step.floor()
    }
}

/// Tick values: the multiples of `step` within `lo..=hi` (at most 100).
pub fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let mut out = Vec::new();
    if !(step > 0.0 && lo.is_finite() && hi.is_finite()) {
        return out;
    }
    let mut k = (lo / step).ceil();
    while k * step <= hi + step * 1e-9 && out.len() < 100 {
        let v = k * step;
        out.push(if v == 0.0 { 0.0 } else { v });
        k += 1.0;
    }
    out
}

/// A tick label: as many decimals as the step needs; scientific for very large or small values.
pub fn tick_label(v: f64, step: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    // The fewest decimals that show multiples of the step exactly (2.5 needs one).
    let decimals = (0..6)
        .find(|d| {
            let scaled = step * 10f64.powi(*d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6) as usize;
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        "0".into()
    } else {
        s
    }
}

/// A number for `data-` attributes and tooltips: integers without decimals.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn open_svg(s: &mut String, class: &str, label: &str, data: &str) {
    let _ = write!(
        s,
        "<svg class=\"plot {class}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" \
         aria-label=\"{label}\" {data}><title>{label}</title>",
        label = esc(label)
    );
}

/// Grid lines and labels of both axes; `x_labels` gives each x tick's text.
fn axes(s: &mut String, x: &Axis, y: &Axis, x_ticks: &[(f64, String)], y_step: f64) {
    s.push_str("<g class=\"grid\">");
    for v in ticks(y.lo, y.hi, y_step) {
        let py = y.px(v);
        let _ = write!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{py:.1}\" y2=\"{py:.1}\"/>",
            WIDTH - RIGHT
        );
    }
    s.push_str("</g><g class=\"axis\">");
    let _ = write!(
        s,
        "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{b:.1}\" y2=\"{b:.1}\"/>\
         <line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{b:.1}\"/>",
        WIDTH - RIGHT,
        b = HEIGHT - BOTTOM
    );
    for v in ticks(y.lo, y.hi, y_step) {
        let _ = write!(
            s,
            "<text class=\"yl\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LEFT - 6.0,
            y.px(v) + 4.0,
            tick_label(v, y_step)
        );
    }
    for (v, label) in x_ticks {
        let px = x.px(*v);
        let _ = write!(
            s,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{b:.1}\" y2=\"{:.1}\"/>\
             <text class=\"xl\" x=\"{px:.1}\" y=\"{:.1}\">{}</text>",
            HEIGHT - BOTTOM + 4.0,
            HEIGHT - BOTTOM + 18.0,
            esc(label),
            b = HEIGHT - BOTTOM
        );
    }
    s.push_str("</g>");
}

/// How a histogram series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// A thin step line (one replica among many).
    Line,
    /// A filled step shape (a single histogram, or a sum).
    Filled,
    /// A thick step line (the mean of the replicas).
    Bold,
}

/// One histogram to draw.
#[derive(Debug, Clone)]
pub struct Series<'a> {
    pub label: String,
    pub bins: &'a [Bin],
    pub look: Look,
    /// Colour class `s{colour % 10}`.
    pub colour: usize,
}

/// The SVG path of a step histogram; gaps between bins start a new piece.
fn step_path(bins: &[Bin], x: &Axis, y: &Axis, filled: bool) -> String {
    let mut d = String::new();
    let base = y.px(0.0f64.clamp(y.lo, y.hi));
    let mut prev_hi: Option<f64> = None;
    for b in bins {
        let (x0, x1, py) = (x.px(b.lo), x.px(b.hi), y.px(b.value));
        let joined = prev_hi.is_some_and(|h| (b.lo - h).abs() <= 1e-9 * (b.hi - b.lo).abs());
        if !joined {
            if let (true, Some(h)) = (filled, prev_hi) {
                let _ = write!(d, "V{base:.1}H{:.1}Z", x.px(h));
            }
            if filled {
                let _ = write!(d, "M{x0:.1},{base:.1}V{py:.1}");
            } else {
                let _ = write!(d, "M{x0:.1},{py:.1}");
            }
        } else {
            let _ = write!(d, "V{py:.1}");
        }
        let _ = write!(d, "H{x1:.1}");
        prev_hi = Some(b.hi);
    }
    if filled && !bins.is_empty() {
        let _ = write!(d, "V{base:.1}Z");
    }
    d
}

/// Histograms overlaid on shared axes. `title` labels the plot for screen readers.
pub fn histograms(title: &str, series: &[Series<'_>]) -> String {
    let all = series.iter().flat_map(|s| s.bins.iter());
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
    let mut n_bins = 0;
    for b in all {
        x_lo = x_lo.min(b.lo);
        x_hi = x_hi.max(b.hi);
        y_lo = y_lo.min(b.value);
        y_hi = y_hi.max(b.value);
        n_bins += 1;
    }
    let data = format!(
        "data-series=\"{}\" data-bins=\"{}\"",
        series.len(),
        series.first().map_or(0, |s| s.bins.len())
    );
    let mut s = String::with_capacity(2048 + n_bins * 24);
    open_svg(&mut s, "hist", title, &data);
    if n_bins == 0 {
        s.push_str("</svg>");
        return s;
    }
    if y_hi <= y_lo {
        y_hi = y_lo + 1.0;
    }
    let y_step = nice_step(y_hi - y_lo, 5);
    // Headroom up to the next tick.
    let y_top = (y_hi / y_step).ceil() * y_step;
    let y_bottom = if y_lo < 0.0 {
        (y_lo / y_step).floor() * y_step
    } else {
        0.0
    };
    let x = Axis {
        lo: x_lo,
        hi: x_hi,
        a: LEFT,
        b: WIDTH - RIGHT,
    };
    let y = Axis {
        lo: y_bottom,
        hi: y_top,
        a: HEIGHT - BOTTOM,
        b: TOP,
    };
    let x_step = nice_step(x_hi - x_lo, 8);
    let x_ticks: Vec<(f64, String)> = ticks(x_lo, x_hi, x_step)
        .into_iter()
        .map(|v| (v, tick_label(v, x_step)))
        .collect();
    axes(&mut s, &x, &y, &x_ticks, y_step);
    // Filled shapes first, bold lines last, so nothing hides the mean.
    let mut order: Vec<&Series<'_>> = series.iter().collect();
    order.sort_by_key(|s| match s.look {
        Look::Filled => 0,
        Look::Line => 1,
        Look::Bold => 2,
    });
    for ser in order {
        let look = match ser.look {
            Look::Line => "line",
            Look::Filled => "filled",
            Look::Bold => "bold",
        };
        let total: f64 = ser.bins.iter().map(|b| b.value).sum();
        let _ = write!(
            s,
            "<path class=\"series s{} {look}\" data-label=\"{}\" data-total=\"{}\" d=\"{}\"><title>{}</title></path>",
            ser.colour % COLOURS,
            esc(&ser.label),
            num(total),
            step_path(ser.bins, &x, &y, ser.look == Look::Filled),
            esc(&ser.label)
        );
    }
    s.push_str("</svg>");
    s
}

/// Steps for time axes, in seconds.
const TIME_STEPS: [u64; 16] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400,
];

/// `-30s`, `-5m`, `-2h`, `-1d`, `now`.
fn time_label(secs_before_now: u64) -> String {
    match secs_before_now {
        0 => "now".into(),
        s if s % 86400 == 0 => format!("-{}d", s / 86400),
        s if s % 3600 == 0 => format!("-{}h", s / 3600),
        s if s % 60 == 0 => format!("-{}m", s / 60),
        s => format!("-{s}s"),
    }
}

/// The x axis of an activity plot: seconds before `end_ms`, ticks at friendly steps.
fn time_axis(a: &Activity, end_ms: u64) -> (Axis, Vec<(f64, String)>) {
    let span = end_ms.saturating_sub(a.start_ms).max(1) as f64 / 1000.0;
    let x = Axis {
        lo: -span,
        hi: 0.0,
        a: LEFT,
        b: WIDTH - RIGHT,
    };
    let step = TIME_STEPS
        .into_iter()
        .find(|s| span / *s as f64 <= 6.0)
        .unwrap_or(86400 * 7);
    let mut t = Vec::new();
    let mut k = 0u64;
    while (k * step) as f64 <= span && t.len() < 20 {
        t.push((-((k * step) as f64), time_label(k * step)));
        k += 1;
    }
    (x, t)
}

/// Draw the axes of an activity plot, time across and counts up to `peak` (at least 1) up;
/// returns both.
fn time_and_count_axes(s: &mut String, a: &Activity, peak: u64) -> (Axis, Axis) {
    let end_ms = a.start_ms + a.bucket_ms * a.done.len().max(a.queued.len()) as u64;
    let (x, x_ticks) = time_axis(a, end_ms);
    let peak = peak.max(1) as f64;
    let y_step = count_step(peak, 5);
    let y = Axis {
        lo: 0.0,
        hi: (peak / y_step).ceil() * y_step,
        a: HEIGHT - BOTTOM,
        b: TOP,
    };
    axes(s, &x, &y, &x_ticks, y_step);
    (x, y)
}

/// Jobs done and failed per bucket as stacked bars, and attempts started (the dispatch rate)
/// as a line, over the activity's window.
pub fn throughput(a: &Activity) -> String {
    let n = a.done.len();
    let done: u64 = a.done.iter().sum();
    let failed: u64 = a.failed.iter().sum();
    let assigned: u64 = a.assigned.iter().sum();
    let data = format!(
        "data-done=\"{done}\" data-failed=\"{failed}\" data-assigned=\"{assigned}\" data-bucket-ms=\"{}\"",
        a.bucket_ms
    );
    let mut s = String::with_capacity(4096 + n * 160);
    open_svg(
        &mut s,
        "activity",
        "jobs finished and attempts started over time",
        &data,
    );
    let peak = (0..n)
        .map(|i| {
            let stacked = a.done[i] + a.failed.get(i).copied().unwrap_or(0);
            stacked.max(a.assigned.get(i).copied().unwrap_or(0))
        })
        .max()
        .unwrap_or(0);
    let (x, y) = time_and_count_axes(&mut s, a, peak);
    let secs = |i: usize| -(n as f64 - i as f64) * a.bucket_ms as f64 / 1000.0;
    let w = (x.px(secs(1)) - x.px(secs(0))).max(1.0);
    let bar_w = (w * 0.8).max(1.0);
    for i in 0..n {
        let (d, f) = (a.done[i], a.failed.get(i).copied().unwrap_or(0));
        if d + f == 0 {
            continue;
        }
        let x0 = x.px(secs(i)) + (w - bar_w) / 2.0;
        let (y_done, y_all) = (y.px(d as f64), y.px((d + f) as f64));
        let base = y.px(0.0);
        let tip = format!("{d} done, {f} failed");
        if d > 0 {
            let _ = write!(
                s,
                "<rect class=\"bar done\" x=\"{x0:.1}\" y=\"{y_done:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\"><title>{tip}</title></rect>",
                base - y_done
            );
        }
        if f > 0 {
            let _ = write!(
                s,
                "<rect class=\"bar failed\" x=\"{x0:.1}\" y=\"{y_all:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\"><title>{tip}</title></rect>",
                y_done - y_all
            );
        }
    }
    if !a.assigned.is_empty() {
        s.push_str("<polyline class=\"rate\" points=\"");
        for (i, v) in a.assigned.iter().enumerate() {
            let _ = write!(s, "{:.1},{:.1} ", x.px(secs(i)) + w / 2.0, y.px(*v as f64));
        }
        s.push_str("\"><title>attempts started</title></polyline>");
    }
    s.push_str("</svg>");
    s
}

/// Jobs queued over time, as a step line (the value at the end of each bucket).
pub fn queue_depth(a: &Activity) -> String {
    let n = a.queued.len();
    let now = a.queued.last().copied().unwrap_or(0);
    let mut s = String::with_capacity(2048 + n * 24);
    open_svg(
        &mut s,
        "depth",
        "jobs queued over time",
        &format!("data-queued-now=\"{now}\""),
    );
    let peak = a.queued.iter().copied().max().unwrap_or(0);
    let (x, y) = time_and_count_axes(&mut s, a, peak);
    let bins: Vec<Bin> = a
        .queued
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let hi = -((n - i - 1) as f64) * a.bucket_ms as f64 / 1000.0;
            Bin {
                lo: hi - a.bucket_ms as f64 / 1000.0,
                hi,
                value: *v as f64,
            }
        })
        .collect();
    let _ = write!(
        s,
        "<path class=\"depth-line\" d=\"{}\"/></svg>",
        step_path(&bins, &x, &y, false)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins(values: &[f64]) -> Vec<Bin> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Bin {
                lo: i as f64,
                hi: i as f64 + 1.0,
                value: *v,
            })
            .collect()
    }

    #[test]
    fn steps_and_ticks_are_round_numbers() {
        assert_eq!(nice_step(10.0, 5), 2.0);
        assert_eq!(nice_step(std::f64::consts::SQRT_2, 8), 0.2);
        assert_eq!(nice_step(12_000.0, 5), 2500.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
        assert_eq!(nice_step(f64::NAN, 5), 1.0);
        assert_eq!(ticks(0.0, 1.0, 0.25), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(ticks(-0.3, 0.3, 0.2), [-0.2, 0.0, 0.2]);
        assert!(ticks(0.0, 1e12, 1e-3).len() <= 100);
        assert!(ticks(0.0, 1.0, 0.0).is_empty());
        assert_eq!(tick_label(0.2, 0.2), "0.2");
        assert_eq!(tick_label(7.5, 2.5), "7.5");
        assert_eq!(tick_label(5.0, 2.5), "5.0");
        assert_eq!(tick_label(0.25, 0.05), "0.25");
        assert_eq!(
            (
                count_step(12.0, 5),
                count_step(1.0, 5),
                count_step(300.0, 5)
            ),
            (2.0, 1.0, 100.0)
        );
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(-0.0, 0.1), "0");
        assert_eq!(tick_label(2.5e7, 5e6), "2.5e7");
        assert_eq!(tick_label(0.00002, 0.00001), "2.0e-5");
    }

    #[test]
    fn a_histogram_becomes_one_step_path_per_series() {
        let a = bins(&[1.0, 3.0, 2.0]);
        let b = bins(&[2.0, 2.0, 2.0]);
        let svg = histograms(
            "h <1>",
            &[
                Series {
                    label: "job 1".into(),
                    bins: &a,
                    look: Look::Line,
                    colour: 0,
                },
                Series {
                    label: "mean & co".into(),
                    bins: &b,
                    look: Look::Bold,
                    colour: 11,
                },
            ],
        );
        assert!(svg.starts_with("<svg class=\"plot hist\""));
        assert!(svg.contains("aria-label=\"h &lt;1&gt;\""));
        assert!(svg.contains("data-series=\"2\" data-bins=\"3\""));
        assert_eq!(svg.matches("<path class=\"series").count(), 2);
        assert!(
            svg.contains("class=\"series s1 bold\" data-label=\"mean &amp; co\" data-total=\"6\"")
        );
        // x from 0 to 3 over 60..626 px; y from 0 to 3 (ticks of 1) over 246..14 px.
        assert!(
            svg.contains("d=\"M60.0,168.7H248.7V14.0H437.3V91.3H626.0\""),
            "{svg}"
        );
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn filled_paths_close_and_gaps_split_them() {
        let gap = vec![
            Bin {
                lo: 0.0,
                hi: 1.0,
                value: 1.0,
            },
            Bin {
                lo: 2.0,
                hi: 3.0,
                value: 1.0,
            },
        ];
        let x = Axis {
            lo: 0.0,
            hi: 3.0,
            a: 0.0,
            b: 3.0,
        };
        let y = Axis {
            lo: 0.0,
            hi: 1.0,
            a: 1.0,
            b: 0.0,
        };
        assert_eq!(
            step_path(&gap, &x, &y, true),
            "M0.0,1.0V0.0H1.0V1.0H1.0ZM2.0,1.0V0.0H3.0V1.0Z"
        );
        assert_eq!(step_path(&gap, &x, &y, false), "M0.0,0.0H1.0M2.0,0.0H3.0");
        let empty = histograms("nothing", &[]);
        assert!(empty.contains("data-series=\"0\"") && !empty.contains("<path"));
    }

    #[test]
    fn activity_plots_carry_their_totals_and_time_labels() {
        let a = Activity {
            start_ms: 1_000_000,
            bucket_ms: 10_000,
            assigned: vec![2, 0, 3],
            done: vec![1, 0, 2],
            failed: vec![0, 0, 1],
            queued: vec![5, 5, 0],
        };
        let svg = throughput(&a);
        assert!(svg.contains("data-done=\"3\" data-failed=\"1\" data-assigned=\"5\""));
        assert_eq!(svg.matches("class=\"bar done\"").count(), 2);
        assert_eq!(svg.matches("class=\"bar failed\"").count(), 1);
        assert!(
            svg.contains(">now</text>") && svg.contains(">-30s</text>"),
            "{svg}"
        );
        let depth = queue_depth(&a);
        assert!(depth.contains("data-queued-now=\"0\""));
        assert!(depth.contains("class=\"depth-line\""));
        assert_eq!(time_label(300), "-5m");
        assert_eq!(time_label(7200), "-2h");
        assert_eq!(time_label(86400), "-1d");
        assert_eq!(time_label(90), "-90s");
        let quiet = throughput(&Activity::default());
        assert!(quiet.contains("data-done=\"0\"") && !quiet.contains("<rect"));
    }
}
