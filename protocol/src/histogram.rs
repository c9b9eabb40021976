//! One-dimensional histograms that jobs return as output files, parsed for plotting: CSV with
//! bin edges and a count per row (what `examples/mc-pi` writes), and the YODA text format of
//! the HEP generators (Rivet), as Test4Theory's jobs produced.
//!
//! The parsers are strict (a bad number, overlapping bins or a truncated block is an error that
//! names the line) and bounded (at most [`MAX_HISTOGRAMS`] per file and [`MAX_BINS`] per
//! histogram); they never panic. The caller bounds the size of the text.

use serde::{Deserialize, Serialize};

/// Most histograms read from one file.
pub const MAX_HISTOGRAMS: usize = 200;
/// Most bins in one histogram.
pub const MAX_BINS: usize = 10_000;

/// One bin: `[lo, hi)` and its content (count or sum of weights).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    pub lo: f64,
    pub hi: f64,
    pub value: f64,
}

/// A 1-D histogram: bins ascending and not overlapping (gaps are allowed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// The YODA path (`/ANALYSIS/d01-x01-y01`), or empty for a CSV file's one histogram.
    pub name: String,
    /// A title for people, if the file gave one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
    pub bins: Vec<Bin>,
}

/// Why a file could not be read as histograms.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("no histogram in the file")]
    Empty,
    #[error("more than {MAX_HISTOGRAMS} histograms")]
    TooMany,
    #[error("the file is not text (UTF-8)")]
    NotText,
    #[error("histograms differ in binning: {0}")]
    Binning(String),
}

fn line_err(line: usize, reason: impl Into<String>) -> HistogramError {
    HistogramError::Line {
        line,
        reason: reason.into(),
    }
}

/// Which format a file name says it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Yoda,
}

impl Format {
    /// The format by file name: `*.csv` or `*.yoda` (any case); `None` for anything else.
    pub fn of_path(path: &str) -> Option<Format> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            Some(Format::Csv)
        } else if lower.ends_with(".yoda") {
            Some(Format::Yoda)
        } else {
            None
        }
    }
}

/// Parse `bytes` in `format`.
pub fn parse(format: Format, bytes: &[u8]) -> Result<Vec<Histogram>, HistogramError> {
    let text = std::str::from_utf8(bytes).map_err(|_| HistogramError::NotText)?;
    match format {
        Format::Csv => parse_csv(text).map(|h| vec![h]),
        Format::Yoda => parse_yoda(text),
    }
}

fn number(line: usize, field: &str) -> Result<f64, HistogramError> {
    let v: f64 = field
        .trim()
        .parse()
        .map_err(|_| line_err(line, format!("{:?} is not a number", clip(field))))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(line_err(line, format!("{:?} is not finite", clip(field))))
    }
}

/// At most 40 characters of `s`, for messages.
fn clip(s: &str) -> String {
    s.trim().chars().take(40).collect()
}

/// Add `bin` after `bins`, checking order and the bin count.
fn push_bin(bins: &mut Vec<Bin>, bin: Bin, line: usize) -> Result<(), HistogramError> {
    if bin.hi <= bin.lo {
        return Err(line_err(
            line,
            format!(
                "bin upper edge {} is not above its lower edge {}",
                bin.hi, bin.lo
            ),
        ));
    }
    if let Some(prev) = bins.last() {
        // Edges written with fewer digits may overlap by a rounding error.
        let slack = 1e-9 * (prev.hi - prev.lo).abs().max(bin.hi - bin.lo);
        if bin.lo < prev.hi - slack {
            return Err(line_err(
                line,
                format!(
                    "bin [{}, {}) overlaps or comes before [{}, {})",
                    bin.lo, bin.hi, prev.lo, prev.hi
                ),
            ));
        }
    }
    if bins.len() == MAX_BINS {
        return Err(line_err(line, format!("more than {MAX_BINS} bins")));
    }
    bins.push(bin);
    Ok(())
}

/// Column names accepted in a CSV header, for the lower edge, the upper edge and the content.
const LO_NAMES: [&str; 5] = ["lo", "low", "xlow", "left", "lower"];
const HI_NAMES: [&str; 5] = ["hi", "high", "xhigh", "right", "upper"];
const VALUE_NAMES: [&str; 7] = ["count", "counts", "n", "value", "sumw", "y", "entries"];

/// CSV: rows `lo,hi,count[,…]`, comma- or tab-separated; an optional header names the columns
/// (else the first three are taken); blank lines and lines starting with `#` are skipped.
pub fn parse_csv(text: &str) -> Result<Histogram, HistogramError> {
    let mut cols: Option<[usize; 3]> = None;
    let mut bins = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = l
            .split(if l.contains(',') { ',' } else { '\t' })
            .map(str::trim)
            .collect();
        if cols.is_none() && bins.is_empty() && fields[0].parse::<f64>().is_err() {
            let find = |names: &[&str]| {
                fields.iter().position(|f| {
                    let f = f.trim_matches('"').to_ascii_lowercase();
                    names.contains(&f.as_str())
                })
            };
            match (find(&LO_NAMES), find(&HI_NAMES), find(&VALUE_NAMES)) {
                (Some(a), Some(b), Some(c)) => cols = Some([a, b, c]),
                _ => {
                    return Err(line_err(
                        line,
                        "header does not name the columns lo, hi and count",
                    ))
                }
            }
            continue;
        }
        let [a, b, c] = *cols.get_or_insert([0, 1, 2]);
        let field = |k: usize| {
            fields.get(k).ok_or_else(|| {
                line_err(
                    line,
                    format!("want at least {} columns", a.max(b).max(c) + 1),
                )
            })
        };
        let bin = Bin {
            lo: number(line, field(a)?)?,
            hi: number(line, field(b)?)?,
            value: number(line, field(c)?)?,
        };
        push_bin(&mut bins, bin, line)?;
    }
    if bins.is_empty() {
        return Err(HistogramError::Empty);
    }
    Ok(Histogram {
        name: String::new(),
        title: String::new(),
        bins,
    })
}

/// The kind of a YODA block we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    /// `YODA_HISTO1D` and `YODA_HISTO1D_V2`: rows `xlow xhigh sumw sumw2 …`, and `Total`,
    /// `Underflow`, `Overflow` rows that are skipped.
    Histo1dV2,
    /// `YODA_HISTO1D_V3` (YODA 2): an `Edges(A1): [...]` line, then one row per bin with the
    /// underflow first and the overflow last, `sumW` first.
    Histo1dV3,
    /// `YODA_SCATTER2D` (V1, V2): rows `x xerr- xerr+ y yerr- yerr+`.
    Scatter2d,
}

fn block_kind(kind: &str) -> Option<Block> {
    match kind {
        "YODA_HISTO1D" | "YODA_HISTO1D_V2" => Some(Block::Histo1dV2),
        "YODA_HISTO1D_V3" => Some(Block::Histo1dV3),
        "YODA_SCATTER2D" | "YODA_SCATTER2D_V2" => Some(Block::Scatter2d),
        _ => None,
    }
}

/// A YODA block being read.
struct Open {
    kind: Block,
    name: String,
    title: String,
    begun: usize,
    edges: Option<Vec<f64>>,
    /// V3 rows (sumW), underflow and overflow included.
    rows: Vec<f64>,
    bins: Vec<Bin>,
}

impl Open {
    fn row(&mut self, line: usize, fields: &[&str]) -> Result<(), HistogramError> {
        match self.kind {
            Block::Histo1dV2 => {
                if matches!(fields[0], "Total" | "Underflow" | "Overflow") {
                    return Ok(());
                }
                if fields.len() < 3 {
                    return Err(line_err(line, "want xlow xhigh sumw …"));
                }
                let bin = Bin {
                    lo: number(line, fields[0])?,
                    hi: number(line, fields[1])?,
                    value: number(line, fields[2])?,
                };
                push_bin(&mut self.bins, bin, line)
            }
            Block::Scatter2d => {
                if fields.len() < 4 {
                    return Err(line_err(line, "want x xerr- xerr+ y …"));
                }
                let x = number(line, fields[0])?;
                let (minus, plus) = (number(line, fields[1])?, number(line, fields[2])?);
                let bin = Bin {
                    lo: x - minus.abs(),
                    hi: x + plus.abs(),
                    value: number(line, fields[3])?,
                };
                push_bin(&mut self.bins, bin, line)
            }
            Block::Histo1dV3 => {
                if self.edges.is_none() {
                    return Err(line_err(line, "a bin row before the Edges(A1) line"));
                }
                if self.rows.len() > MAX_BINS + 1 {
                    return Err(line_err(line, format!("more than {MAX_BINS} bins")));
                }
                self.rows.push(number(line, fields[0])?);
                Ok(())
            }
        }
    }

    fn finish(self, line: usize) -> Result<Option<Histogram>, HistogramError> {
        let mut bins = self.bins;
        if let Some(edges) = self.edges {
            // Underflow, one row per bin, overflow.
            if self.rows.len() != edges.len() + 1 {
                return Err(line_err(
                    line,
                    format!(
                        "{} has {} edges but {} rows (want {})",
                        self.name,
                        edges.len(),
                        self.rows.len(),
                        edges.len() + 1
                    ),
                ));
            }
            for (k, w) in edges.windows(2).enumerate() {
                let bin = Bin {
                    lo: w[0],
                    hi: w[1],
                    value: self.rows[k + 1],
                };
                push_bin(&mut bins, bin, line)?;
            }
        }
        if bins.is_empty() {
            return Ok(None);
        }
        Ok(Some(Histogram {
            name: self.name,
            title: self.title,
            bins,
        }))
    }
}

/// `[a, b, c]` → numbers.
fn parse_edges(line: usize, list: &str) -> Result<Vec<f64>, HistogramError> {
    let inner = list
        .trim()
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| line_err(line, "Edges(A1) wants a list in brackets"))?;
    let mut edges = Vec::new();
    for f in inner.split(',') {
        if edges.len() > MAX_BINS {
            return Err(line_err(line, format!("more than {MAX_BINS} bins")));
        }
        edges.push(number(line, f)?);
    }
    if edges.len() < 2 {
        return Err(line_err(line, "want at least two edges"));
    }
    Ok(edges)
}

/// YODA text: the 1-D histograms and scatters in it (`BEGIN YODA_… /path` … `END YODA_…`).
/// Other objects (counters, profiles, 2-D histograms) are skipped.
pub fn parse_yoda(text: &str) -> Result<Vec<Histogram>, HistogramError> {
    let mut out = Vec::new();
    let mut open: Option<Open> = None;
    // Inside an object we skip: its END line.
    let mut skipping: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if let Some(end) = &skipping {
            if l.strip_prefix("END ").is_some_and(|k| k.trim() == end) {
                skipping = None;
            }
            continue;
        }
        if let Some(rest) = l.strip_prefix("BEGIN ") {
            if let Some(o) = &open {
                return Err(line_err(
                    line,
                    format!("BEGIN inside the block opened on line {}", o.begun),
                ));
            }
            let mut words = rest.split_whitespace();
            let kind = words.next().unwrap_or_default();
            let name = words.next().unwrap_or_default().to_owned();
            match block_kind(kind) {
                Some(kind) => {
                    open = Some(Open {
                        kind,
                        name,
                        title: String::new(),
                        begun: line,
                        edges: None,
                        rows: Vec::new(),
                        bins: Vec::new(),
                    })
                }
                None => skipping = Some(kind.to_owned()),
            }
            continue;
        }
        let Some(o) = open.as_mut() else {
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            return Err(line_err(line, "text outside a BEGIN … END block"));
        };
        if l.starts_with("END ") {
            let o = open.take().unwrap_or_else(|| unreachable!("checked above"));
            if let Some(h) = o.finish(line)? {
                if out.len() == MAX_HISTOGRAMS {
                    return Err(HistogramError::TooMany);
                }
                out.push(h);
            }
            continue;
        }
        if l.is_empty() || l.starts_with('#') || l == "---" {
            continue;
        }
        if let Some(t) = l.strip_prefix("Title:") {
            o.title = t.trim().chars().take(200).collect();
            continue;
        }
        if let Some(list) = l.strip_prefix("Edges(A1):") {
            o.edges = Some(parse_edges(line, list)?);
            continue;
        }
        // Other `Key: value` annotations (Path, Type, ScaledBy, …).
        let first = l.split_whitespace().next().unwrap_or_default();
        if first.len() > 1
            && first.ends_with(':')
            && first.chars().next().is_some_and(char::is_alphabetic)
        {
            continue;
        }
        let fields: Vec<&str> = l.split_whitespace().collect();
        o.row(line, &fields)?;
    }
    if let Some(o) = open {
        return Err(line_err(
            o.begun,
            format!("block {} has no END", clip(&o.name)),
        ));
    }
    if out.is_empty() {
        return Err(HistogramError::Empty);
    }
    Ok(out)
}

/// Whether two histograms have the same bins (edges equal up to rounding).
pub fn same_binning(a: &[Bin], b: &[Bin]) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-300);
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(p, q)| close(p.lo, q.lo) && close(p.hi, q.hi))
}

/// The bin-by-bin sum of `parts`, which must share their binning.
pub fn sum(parts: &[&[Bin]]) -> Result<Vec<Bin>, HistogramError> {
    let Some(first) = parts.first() else {
        return Err(HistogramError::Empty);
    };
    let mut total = first.to_vec();
    for (k, p) in parts.iter().enumerate().skip(1) {
        if !same_binning(first, p) {
            return Err(HistogramError::Binning(format!(
                "part {} has {} bins from {} to {}, the first {} bins from {} to {}",
                k + 1,
                p.len(),
                p.first().map_or(0.0, |b| b.lo),
                p.last().map_or(0.0, |b| b.hi),
                first.len(),
                first.first().map_or(0.0, |b| b.lo),
                first.last().map_or(0.0, |b| b.hi),
            )));
        }
        for (t, b) in total.iter_mut().zip(p.iter()) {
            t.value += b.value;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(h: &Histogram) -> Vec<f64> {
        h.bins.iter().map(|b| b.value).collect()
    }

    #[test]
    fn mc_pi_csv_parses() {
        let h = parse_csv(
            "lo,hi,count\n0.000000,0.070711,393\n0.070711,0.141421,1183\n0.141421,0.212132,1962\n",
        )
        .unwrap();
        assert_eq!(h.bins.len(), 3);
        assert_eq!(values(&h), [393.0, 1183.0, 1962.0]);
        assert_eq!((h.bins[1].lo, h.bins[1].hi), (0.070711, 0.141421));
    }

    #[test]
    fn csv_headers_pick_columns_and_tabs_comments_work() {
        let h = parse_csv("# made by hand\ncount,xhigh,xlow\n5,1,0\n\n7,2,1\n").unwrap();
        assert_eq!(values(&h), [5.0, 7.0]);
        assert_eq!((h.bins[1].lo, h.bins[1].hi), (1.0, 2.0));
        let h = parse_csv("0\t1\t3\n1\t2\t4\n").unwrap();
        assert_eq!(values(&h), [3.0, 4.0]);
        // Gaps between bins are allowed.
        assert!(parse_csv("0,1,1\n5,6,1\n").is_ok());
    }

    #[test]
    fn bad_csv_is_refused_with_the_line() {
        for (text, line, needle) in [
            ("lo,hi,count\n0,1,x\n", 2, "not a number"),
            ("0,1,2\n1,2\n", 2, "columns"),
            ("0,1,2\n0.5,2,1\n", 2, "overlaps"),
            ("1,1,2\n", 1, "not above"),
            ("a,b,c\n0,1,2\n", 1, "header"),
            ("0,1,NaN\n", 1, "not finite"),
            ("0,1,inf\n", 1, "not finite"),
        ] {
            match parse_csv(text) {
                Err(HistogramError::Line { line: l, reason }) => {
                    assert_eq!(l, line, "{text:?}: {reason}");
                    assert!(reason.contains(needle), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert_eq!(parse_csv("# nothing\n"), Err(HistogramError::Empty));
        assert_eq!(parse_csv("lo,hi,count\n"), Err(HistogramError::Empty));
        assert_eq!(
            parse(Format::Csv, b"\xff\xfe"),
            Err(HistogramError::NotText)
        );
    }

    #[test]
    fn csv_bins_are_bounded() {
        let mut text = String::new();
        for i in 0..=MAX_BINS {
            text.push_str(&format!("{i},{},1\n", i + 1));
        }
        let err = parse_csv(&text).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }

    const YODA_V2: &str = "\
BEGIN YODA_HISTO1D_V2 /MC_TEST/d01-x01-y01
Path: /MC_TEST/d01-x01-y01
ScaledBy: 0.5
Title: Charged multiplicity
Type: Histo1D
---
# Mean: 1.5
# Area: 6
# ID\t ID\t sumw\t sumw2\t sumwx\t sumwx2\t numEntries
Total   \tTotal   \t6\t6\t9\t15\t6
Underflow\tUnderflow\t0\t0\t0\t0\t0
Overflow\tOverflow\t0\t0\t0\t0\t0
# xlow\t xhigh\t sumw\t sumw2\t sumwx\t sumwx2\t numEntries
0.000000e+00\t1.000000e+00\t1.000000e+00\t1\t0.5\t0.25\t1
1.000000e+00\t2.000000e+00\t5.000000e+00\t5\t7.5\t11.25\t5
END YODA_HISTO1D_V2

BEGIN YODA_COUNTER_V2 /_EVTCOUNT
Path: /_EVTCOUNT
# sumW\t sumW2\t numEntries
1000\t1000\t1000
END YODA_COUNTER_V2

BEGIN YODA_SCATTER2D_V2 /REF/MC_TEST/d02-x01-y01
Path: /REF/MC_TEST/d02-x01-y01
Type: Scatter2D
---
# xval\t xerr-\t xerr+\t yval\t yerr-\t yerr+
1.5\t0.5\t0.5\t2.0\t0.1\t0.1
2.5\t0.5\t0.5\t3.0\t0.1\t0.1
END YODA_SCATTER2D_V2
";

    #[test]
    fn yoda_v2_histograms_and_scatters_parse_and_counters_are_skipped() {
        let hs = parse_yoda(YODA_V2).unwrap();
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0].name, "/MC_TEST/d01-x01-y01");
        assert_eq!(hs[0].title, "Charged multiplicity");
        assert_eq!(values(&hs[0]), [1.0, 5.0]);
        assert_eq!(hs[1].name, "/REF/MC_TEST/d02-x01-y01");
        assert_eq!((hs[1].bins[0].lo, hs[1].bins[0].hi), (1.0, 2.0));
        assert_eq!(values(&hs[1]), [2.0, 3.0]);
        assert_eq!(parse(Format::Yoda, YODA_V2.as_bytes()).unwrap(), hs);
    }

    #[test]
    fn yoda2_edges_blocks_parse_without_under_and_overflow() {
        let text = "\
BEGIN YODA_HISTO1D_V3 /T/h
Path: /T/h
Type: Histo1D
---
# Mean: 1
Edges(A1): [0.0, 0.5, 1.0, 2.0]
# sumW\t sumW2\t sumW(A1)\t sumW2(A1)\t numEntries
9\t0\t0\t0\t0
1\t1\t0\t0\t1
2\t2\t0\t0\t2
3\t3\t0\t0\t3
9\t0\t0\t0\t0
END YODA_HISTO1D_V3
";
        let hs = parse_yoda(text).unwrap();
        assert_eq!(hs.len(), 1);
        assert_eq!(values(&hs[0]), [1.0, 2.0, 3.0]);
        assert_eq!((hs[0].bins[2].lo, hs[0].bins[2].hi), (1.0, 2.0));
        let short = text.replace("3\t3\t0\t0\t3\n", "");
        assert!(parse_yoda(&short).unwrap_err().to_string().contains("rows"));
    }

    #[test]
    fn bad_yoda_is_refused_with_the_line() {
        let cases = [
            ("BEGIN YODA_HISTO1D_V2 /a\n0 1 x\nEND YODA_HISTO1D_V2\n", 2),
            ("BEGIN YODA_HISTO1D_V2 /a\n0 1 1\n", 1),
            ("BEGIN YODA_HISTO1D_V2 /a\nBEGIN YODA_HISTO1D_V2 /b\n", 2),
            ("stray text\n", 1),
            ("BEGIN YODA_HISTO1D_V3 /a\n1 2 3\nEND YODA_HISTO1D_V3\n", 2),
            (
                "BEGIN YODA_HISTO1D_V3 /a\nEdges(A1): 0, 1\nEND YODA_HISTO1D_V3\n",
                2,
            ),
            ("BEGIN YODA_SCATTER2D /s\n1 2\nEND YODA_SCATTER2D\n", 2),
        ];
        for (text, line) in cases {
            match parse_yoda(text) {
                Err(HistogramError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert_eq!(
            parse_yoda("BEGIN YODA_COUNTER_V2 /c\n1 1 1\nEND YODA_COUNTER_V2\n"),
            Err(HistogramError::Empty)
        );
    }

    #[test]
    fn yoda_histogram_count_is_bounded() {
        let one = "BEGIN YODA_HISTO1D /h\n0 1 1\nEND YODA_HISTO1D\n";
        let text = one.repeat(MAX_HISTOGRAMS + 1);
        assert_eq!(parse_yoda(&text), Err(HistogramError::TooMany));
        assert_eq!(parse_yoda(&one.repeat(3)).unwrap().len(), 3);
    }

    #[test]
    fn sums_need_the_same_binning() {
        let a = parse_csv("0,1,1\n1,2,2\n").unwrap();
        let b = parse_csv("0,1.0000000000001,10\n1.0000000000001,2,20\n").unwrap();
        let s = sum(&[&a.bins, &b.bins, &a.bins]).unwrap();
        assert_eq!(s.iter().map(|b| b.value).collect::<Vec<_>>(), [12.0, 24.0]);
        let c = parse_csv("0,2,1\n").unwrap();
        assert!(matches!(
            sum(&[&a.bins, &c.bins]),
            Err(HistogramError::Binning(_))
        ));
        assert_eq!(sum(&[]), Err(HistogramError::Empty));
        assert_eq!(Format::of_path("out/H.CSV"), Some(Format::Csv));
        assert_eq!(Format::of_path("run.yoda"), Some(Format::Yoda));
        assert_eq!(Format::of_path("result.txt"), None);
    }
}
