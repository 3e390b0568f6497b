//! Comparing a results directory with a baseline: the CI gate for results.
//!
//! Owns: reading two directories of CSV tables (streamed: a table is never held in memory,
//! see [`compare_sources`]), matching each table's rows by its key columns, comparing the
//! value columns within a tolerance, and a [`Report`] with the largest differences and an
//! exit code. Must not: know which metric wrote a table or how a run
//! writes its directory (staging, manifest): any two directories of CSVs compare.
//!
//! A column is a *value* column when any cell of it, in either table, is a float (has a `.`,
//! an exponent, or is `NaN`/`inf`); every other column (strings and integers: `dataset`,
//! `layer`, `head`, `seq`, `pos`, `token`, counts) is part of the row's *key*. Keys must match
//! exactly; values must satisfy `|new - base| <= atol + rtol * |base|` (numpy's `isclose`),
//! with NaN equal only to NaN.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Exit code when every table matches.
pub const EXIT_MATCH: u8 = 0;
/// Exit code when the tables line up but some value is beyond the tolerance.
pub const EXIT_DRIFT: u8 = 4;
/// Exit code when a table is missing or extra, or its columns or keys differ.
pub const EXIT_STRUCTURE: u8 = 5;

/// How far a value may move: `|new - base| <= atol + rtol * |base|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Default for Tolerance {
    /// The parity tolerance of the test suite (f32 results, any CPU).
    fn default() -> Self {
        Tolerance {
            rtol: 1e-4,
            atol: 1e-5,
        }
    }
}

/// One value that differs between the tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Diff {
    /// The row's key, `col=value` pairs joined by spaces.
    pub key: String,
    pub column: String,
    pub new: String,
    pub baseline: String,
    /// `|new - base|` (infinite when only one side is NaN or empty).
    pub abs: f64,
    /// `abs / (atol + rtol * |base|)`: above 1 is beyond the tolerance.
    pub excess: f64,
}

/// What became of one table.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every key matched and every value is within the tolerance.
    Match,
    /// Keys matched; `beyond` values are beyond the tolerance.
    Drift { beyond: usize },
    /// In the baseline, not in the new results.
    Missing,
    /// In the new results, not in the baseline (a new metric: update the baseline).
    Extra,
    /// The columns or the row keys differ; each line says how.
    Structure(Vec<String>),
}

/// The comparison of one table (`name.csv`).
#[derive(Debug, Clone)]
pub struct TableReport {
    pub name: String,
    pub outcome: Outcome,
    pub rows: usize,
    pub keys: Vec<String>,
    pub values: Vec<String>,
    /// The largest differences, worst (relative to the tolerance) first.
    pub worst: Vec<Diff>,
}

/// The comparison of two directories.
#[derive(Debug, Clone)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub tolerance: Tolerance,
}

impl Report {
    /// [`EXIT_STRUCTURE`] if any table is missing, extra or re-keyed, else [`EXIT_DRIFT`] if
    /// any value drifted, else [`EXIT_MATCH`].
    pub fn exit_code(&self) -> u8 {
        let structural =
            |o: &Outcome| matches!(o, Outcome::Missing | Outcome::Extra | Outcome::Structure(_));
        if self.tables.iter().any(|t| structural(&t.outcome)) {
            EXIT_STRUCTURE
        } else if self
            .tables
            .iter()
            .any(|t| matches!(t.outcome, Outcome::Drift { .. }))
        {
            EXIT_DRIFT
        } else {
            EXIT_MATCH
        }
    }

    /// A plain-text report: one line per table, then its largest differences (up to `show`)
    /// or what differs in its structure.
    pub fn render(&self, show: usize) -> String {
        let mut s = String::new();
        let Tolerance { rtol, atol } = self.tolerance;
        for t in &self.tables {
            let head = match &t.outcome {
                Outcome::Match => "ok     ",
                Outcome::Drift { .. } => "DRIFT  ",
                Outcome::Missing => "MISSING",
                Outcome::Extra => "EXTRA  ",
                Outcome::Structure(_) => "KEYS   ",
            };
            s.push_str(&format!("{head} {}", t.name));
            match &t.outcome {
                Outcome::Match | Outcome::Drift { .. } => {
                    let n = t.rows * t.values.len();
                    s.push_str(&format!(
                        ": {} rows, keys [{}], {n} values",
                        t.rows,
                        t.keys.join(", ")
                    ));
                    if let Outcome::Drift { beyond } = t.outcome {
                        s.push_str(&format!(", {beyond} beyond rtol {rtol:e} / atol {atol:e}"));
                    }
                    match t.worst.first() {
                        Some(w) => s.push_str(&format!(", largest |diff| {:.3e}", w.abs)),
                        None => s.push_str(", all identical"),
                    }
                    s.push('\n');
                    let n_show = if t.outcome == Outcome::Match { 1 } else { show };
                    for d in t.worst.iter().take(n_show) {
                        s.push_str(&format!(
                            "    {} {}: new {} baseline {} |diff| {:.3e} ({:.2}x tolerance)\n",
                            d.key, d.column, d.new, d.baseline, d.abs, d.excess
                        ));
                    }
                }
                Outcome::Missing => s.push_str(": in the baseline, not in the new results\n"),
                Outcome::Extra => {
                    s.push_str(": in the new results, not in the baseline (add it there)\n")
                }
                Outcome::Structure(lines) => {
                    s.push('\n');
                    for l in lines.iter().take(show.max(1)) {
                        s.push_str(&format!("    {l}\n"));
                    }
                    if lines.len() > show.max(1) {
                        s.push_str(&format!("    ... {} more\n", lines.len() - show.max(1)));
                    }
                }
            }
        }
        let verdict = match self.exit_code() {
            EXIT_MATCH => "results match the baseline",
            EXIT_DRIFT => "results drifted from the baseline",
            _ => "results do not line up with the baseline",
        };
        s.push_str(&format!("{verdict} ({} tables)\n", self.tables.len()));
        s
    }
}

/// The `*.csv` files directly in `dir`, by file name.
fn csv_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "csv") {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            out.insert(name, p);
        }
    }
    Ok(out)
}

/// Compares every CSV table in `new` with the one of the same name in `baseline`, each
/// streamed from its file ([`compare_sources`]).
pub fn compare_dirs(new: &Path, baseline: &Path, tol: Tolerance) -> Result<Report> {
    let (n, b) = (csv_files(new)?, csv_files(baseline)?);
    if b.is_empty() {
        return Err(Error::Other(format!(
            "{}: no CSV tables in the baseline directory",
            baseline.display()
        )));
    }
    let mut names: Vec<&String> = n.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    let mut tables = Vec::new();
    for name in names {
        let empty = |outcome| TableReport {
            name: name.clone(),
            outcome,
            rows: 0,
            keys: vec![],
            values: vec![],
            worst: vec![],
        };
        tables.push(match (n.get(name), b.get(name)) {
            (Some(np), Some(bp)) => {
                compare_sources(name, &CsvFile(np.clone()), &CsvFile(bp.clone()), tol)?
            }
            (None, _) => empty(Outcome::Missing),
            (_, None) => empty(Outcome::Extra),
        });
    }
    Ok(Report {
        tables,
        tolerance: tol,
    })
}

/// A CSV table: its header and rows of cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Parses CSV text (a header line, then rows of the same width).
    pub fn parse(text: &str) -> std::result::Result<Table, String> {
        let mut r = csv::ReaderBuilder::new().from_reader(text.as_bytes());
        let header = r
            .headers()
            .map_err(|e| e.to_string())?
            .iter()
            .map(str::to_string)
            .collect();
        let mut rows = Vec::new();
        for rec in r.records() {
            rows.push(
                rec.map_err(|e| e.to_string())?
                    .iter()
                    .map(str::to_string)
                    .collect(),
            );
        }
        Ok(Table { header, rows })
    }
}

/// Rows of a table, read once per pass.
type Rows<'a> = Box<dyn Iterator<Item = Result<csv::StringRecord>> + 'a>;

/// A table that can be read from the start as often as a comparison needs (three passes at
/// most), one row at a time.
pub trait Source {
    fn header(&self) -> Result<Vec<String>>;
    fn rows(&self) -> Result<Rows<'_>>;
}

impl Source for Table {
    fn header(&self) -> Result<Vec<String>> {
        Ok(self.header.clone())
    }
    fn rows(&self) -> Result<Rows<'_>> {
        Ok(Box::new(
            self.rows
                .iter()
                .map(|r| Ok(csv::StringRecord::from(r.clone()))),
        ))
    }
}

/// A CSV file, streamed.
struct CsvFile(PathBuf);

impl CsvFile {
    fn reader(&self) -> Result<csv::Reader<std::io::BufReader<std::fs::File>>> {
        let f = std::fs::File::open(&self.0).map_err(|source| Error::Io {
            path: self.0.clone(),
            source,
        })?;
        Ok(csv::ReaderBuilder::new().from_reader(std::io::BufReader::with_capacity(1 << 20, f)))
    }
}

impl Source for CsvFile {
    fn header(&self) -> Result<Vec<String>> {
        let mut r = self.reader()?;
        let h = r
            .headers()
            .map_err(|e| Error::Other(format!("{}: {e}", self.0.display())))?;
        Ok(h.iter().map(str::to_string).collect())
    }
    fn rows(&self) -> Result<Rows<'_>> {
        let path = self.0.clone();
        Ok(Box::new(self.reader()?.into_records().map(move |r| {
            r.map_err(|e| Error::Other(format!("{}: {e}", path.display())))
        })))
    }
}

/// A cell that only a float column holds: a decimal point, an exponent, NaN or infinity.
fn is_float_cell(s: &str) -> bool {
    let t = s.trim();
    if t.parse::<f64>().is_err() {
        return false;
    }
    let l = t.to_ascii_lowercase();
    l.contains(['.', 'e']) || l.contains("nan") || l.contains("inf")
}

fn parse_value(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok()
}

/// Compares one table with its baseline; `name` is for the report. In memory; see
/// [`compare_sources`].
pub fn compare_tables(name: &str, new: &Table, base: &Table, tol: Tolerance) -> TableReport {
    compare_sources(name, new, base, tol).expect("tables in memory read without errors")
}

/// At most this many structural problems are kept per table (the count goes on).
const MAX_PROBLEMS: usize = 1000;

/// A row waiting for its partner: its 1-based data row and value cells.
type Pending = HashMap<Vec<String>, (usize, Vec<String>)>;

/// Compares one table with its baseline, streaming both: pass 1 finds the value columns
/// (any float cell in either table), pass 2 walks the two tables side by side, matching rows
/// by key through two maps of rows still waiting for their partner (a window: a row or two
/// when the tables are in the same order, as a run writes them; at most one table's rows
/// when the order is wholly different) and keeping a 32-bit hash of each baseline row's key
/// to find duplicate keys, which a third pass confirms and names (only when a hash
/// repeats). Memory: 4 bytes per baseline row plus the window, never the tables.
pub fn compare_sources(
    name: &str,
    new: &dyn Source,
    base: &dyn Source,
    tol: Tolerance,
) -> Result<TableReport> {
    let header = base.header()?;
    let mut report = TableReport {
        name: name.to_string(),
        outcome: Outcome::Match,
        rows: 0,
        keys: vec![],
        values: vec![],
        worst: vec![],
    };
    let new_header = new.header()?;
    if new_header != header {
        report.outcome = Outcome::Structure(vec![format!(
            "columns differ: new [{}], baseline [{}]",
            new_header.join(", "),
            header.join(", ")
        )]);
        return Ok(report);
    }
    // Pass 1: which columns are values.
    let ncols = header.len();
    let mut is_value = vec![false; ncols];
    let mut base_rows = 0usize;
    for (i, src) in [new, base].into_iter().enumerate() {
        for r in src.rows()? {
            let r = r?;
            base_rows += i;
            for (c, v) in is_value.iter_mut().enumerate() {
                if !*v && r.get(c).is_some_and(is_float_cell) {
                    *v = true;
                }
            }
        }
    }
    let key_cols: Vec<usize> = (0..ncols).filter(|&c| !is_value[c]).collect();
    let val_cols: Vec<usize> = (0..ncols).filter(|&c| is_value[c]).collect();
    report.keys = key_cols.iter().map(|&c| header[c].clone()).collect();
    report.values = val_cols.iter().map(|&c| header[c].clone()).collect();
    let key_of = |r: &csv::StringRecord| -> Vec<String> {
        key_cols
            .iter()
            .map(|&c| r.get(c).unwrap_or_default().to_string())
            .collect()
    };
    let values_of = |r: &csv::StringRecord| -> Vec<String> {
        val_cols
            .iter()
            .map(|&c| r.get(c).unwrap_or_default().to_string())
            .collect()
    };
    let show_key = |k: &[String]| -> String {
        report
            .keys
            .iter()
            .zip(k)
            .map(|(c, v)| format!("{c}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // 32 bits: 4 bytes a row; a repeat is only a candidate, confirmed by the third pass.
    let hash = |k: &[String]| -> u32 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        h.finish() as u32
    };

    // Pass 2: side by side.
    let (mut pending_new, mut pending_base): (Pending, Pending) = Default::default();
    let mut hashes_base: Vec<u32> = Vec::with_capacity(base_rows);
    let mut diffs: Vec<Diff> = Vec::new();
    let mut beyond = 0usize;
    let mut compare_row = |key: &[String], n: &[String], b: &[String], diffs: &mut Vec<Diff>| {
        for (i, (ns, bs)) in n.iter().zip(b).enumerate() {
            let (abs, excess) = cell_diff(ns, bs, tol);
            if abs == 0.0 {
                continue;
            }
            if excess > 1.0 {
                beyond += 1;
            }
            diffs.push(Diff {
                key: show_key(key),
                column: report.values[i].clone(),
                new: ns.clone(),
                baseline: bs.clone(),
                abs,
                excess,
            });
            // Only the worst 20 are reported: keep the list short as the table streams.
            if diffs.len() >= 400 {
                sort_worst(diffs);
                diffs.truncate(20);
            }
        }
    };
    let (mut it_new, mut it_base) = (new.rows()?, base.rows()?);
    let (mut row_new, mut row_base) = (0usize, 0usize);
    loop {
        let b = it_base.next().transpose()?;
        let n = it_new.next().transpose()?;
        if b.is_none() && n.is_none() {
            break;
        }
        if let Some(b) = b {
            row_base += 1;
            let (k, v) = (key_of(&b), values_of(&b));
            hashes_base.push(hash(&k));
            match pending_new.remove(&k) {
                Some((_, nv)) => compare_row(&k, &nv, &v, &mut diffs),
                None => {
                    pending_base.entry(k).or_insert((row_base, v));
                }
            }
        }
        if let Some(n) = n {
            row_new += 1;
            let (k, v) = (key_of(&n), values_of(&n));
            match pending_base.remove(&k) {
                Some((_, bv)) => compare_row(&k, &v, &bv, &mut diffs),
                None => {
                    pending_new.entry(k).or_insert((row_new, v));
                }
            }
        }
    }
    report.rows = row_base;

    let mut problems = Vec::new();
    let mut more = 0usize;
    let mut problem = |p: String, problems: &mut Vec<String>| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        } else {
            more += 1;
        }
    };
    // Duplicate keys in the baseline: hashes that repeat, confirmed (and named) by a third
    // pass. (A key repeated only in the new table leaves a new row without a partner.)
    for (which, src, mut hashes) in [("baseline", base, hashes_base)] {
        hashes.sort_unstable();
        let repeated: std::collections::HashSet<u32> = hashes
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        drop(hashes);
        if repeated.is_empty() {
            continue;
        }
        let mut seen: HashMap<Vec<String>, usize> = HashMap::new();
        for (i, r) in src.rows()?.enumerate() {
            let k = key_of(&r?);
            if !repeated.contains(&hash(&k)) {
                continue;
            }
            if let Some(first) = seen.insert(k.clone(), i) {
                problem(
                    format!(
                        "{which} rows {} and {} have the same key ({}): the key columns do not \
                         identify a row",
                        first + 2,
                        i + 2,
                        show_key(&k)
                    ),
                    &mut problems,
                );
            }
        }
    }
    let dup_found = !problems.is_empty();
    let mut left_base: Vec<_> = pending_base.into_iter().collect();
    left_base.sort_by_key(|(_, (row, _))| *row);
    for (k, (row, _)) in left_base {
        if !dup_found {
            problem(
                format!(
                    "baseline row {} ({}) has no match in the new table",
                    row + 1,
                    show_key(&k)
                ),
                &mut problems,
            );
        }
    }
    let mut left_new: Vec<_> = pending_new.into_iter().collect();
    left_new.sort_by_key(|(_, (row, _))| *row);
    for (k, (row, _)) in left_new {
        if !dup_found {
            problem(
                format!(
                    "new row {} ({}) has no match in the baseline",
                    row + 1,
                    show_key(&k)
                ),
                &mut problems,
            );
        }
    }
    if more > 0 {
        problems.push(format!("and {more} more problems in this table"));
    }
    if !problems.is_empty() {
        report.outcome = Outcome::Structure(problems);
        return Ok(report);
    }
    sort_worst(&mut diffs);
    diffs.truncate(20);
    report.worst = diffs;
    if beyond > 0 {
        report.outcome = Outcome::Drift { beyond };
    }
    Ok(report)
}

fn sort_worst(diffs: &mut [Diff]) {
    diffs.sort_by(|a, b| b.excess.total_cmp(&a.excess).then(b.abs.total_cmp(&a.abs)));
}

/// `(|new - base|, that / tolerance)` of one cell; `(0, 0)` when equal, infinite when only
/// one side is NaN or a number.
fn cell_diff(ns: &str, bs: &str, tol: Tolerance) -> (f64, f64) {
    match (parse_value(ns), parse_value(bs)) {
        (Some(x), Some(y)) if x.is_nan() && y.is_nan() => (0.0, 0.0),
        (Some(x), Some(y)) if x == y => (0.0, 0.0), // equal infinities too
        (Some(x), Some(y)) => {
            let abs = (x - y).abs();
            let allowed = tol.atol + tol.rtol * y.abs();
            let excess = if allowed > 0.0 {
                abs / allowed
            } else {
                f64::INFINITY
            };
            // NaN against a number, or inf against a finite value, is always drift.
            if abs.is_nan() {
                (f64::INFINITY, f64::INFINITY)
            } else {
                (abs, excess)
            }
        }
        (None, None) if ns.trim() == bs.trim() => (0.0, 0.0),
        _ => (f64::INFINITY, f64::INFINITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Table {
        Table::parse(s).unwrap()
    }

    const BASE: &str = "dataset,layer,head,score,n\nioi,0,0,0.5,10\nioi,0,1,-1.25e-3,10\n";

    #[test]
    fn columns_split_into_keys_and_values() {
        let r = compare_tables("x.csv", &t(BASE), &t(BASE), Tolerance::default());
        assert_eq!(r.keys, ["dataset", "layer", "head", "n"]);
        assert_eq!(r.values, ["score"]);
        assert_eq!(r.outcome, Outcome::Match);
        assert!(r.worst.is_empty());
    }

    #[test]
    fn rows_match_by_key_not_by_order() {
        let new = "dataset,layer,head,score,n\nioi,0,1,-0.00125,10\nioi,0,0,0.50000001,10\n";
        let r = compare_tables("x.csv", &t(new), &t(BASE), Tolerance::default());
        assert_eq!(r.outcome, Outcome::Match);
        assert_eq!(r.worst.len(), 1);
        assert!(r.worst[0].excess < 1.0);
    }

    #[test]
    fn tolerance_is_numpy_isclose() {
        let new = "dataset,layer,head,score,n\nioi,0,0,0.5001,10\nioi,0,1,-1.25e-3,10\n";
        let tol = |rtol, atol| Tolerance { rtol, atol };
        let r = compare_tables("x.csv", &t(new), &t(BASE), tol(1e-4, 0.0));
        assert_eq!(r.outcome, Outcome::Drift { beyond: 1 });
        assert_eq!(r.worst[0].key, "dataset=ioi layer=0 head=0 n=10");
        assert_eq!(r.worst[0].column, "score");
        let r = compare_tables("x.csv", &t(new), &t(BASE), tol(3e-4, 0.0));
        assert_eq!(r.outcome, Outcome::Match);
        let r = compare_tables("x.csv", &t(new), &t(BASE), tol(0.0, 2e-4));
        assert_eq!(r.outcome, Outcome::Match);
    }

    #[test]
    fn nan_equals_only_nan() {
        let b = "k,v\na,NaN\nb,1.0\n";
        let r = compare_tables("x.csv", &t(b), &t(b), Tolerance::default());
        assert_eq!(r.outcome, Outcome::Match);
        let n = "k,v\na,0.0\nb,NaN\n";
        let r = compare_tables("x.csv", &t(n), &t(b), Tolerance::default());
        assert_eq!(r.outcome, Outcome::Drift { beyond: 2 });
    }

    #[test]
    fn a_column_of_integers_that_becomes_float_is_a_value() {
        // score_negative is all 0 in the baseline; one float in the new table makes it a value
        // column for both, so the change is drift, not a key mismatch.
        let b = "k,s\na,0\nb,0\n";
        let n = "k,s\na,0\nb,0.5\n";
        let r = compare_tables("x.csv", &t(n), &t(b), Tolerance::default());
        assert_eq!(r.keys, ["k"]);
        assert_eq!(r.outcome, Outcome::Drift { beyond: 1 });
    }

    #[test]
    fn different_keys_columns_or_duplicates_are_structural() {
        let rekeyed = "dataset,layer,head,score,n\nioi,0,0,0.5,10\nioi,1,1,-1.25e-3,10\n";
        let r = compare_tables("x.csv", &t(rekeyed), &t(BASE), Tolerance::default());
        let Outcome::Structure(lines) = &r.outcome else {
            panic!("{:?}", r.outcome)
        };
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("layer=0 head=1"), "{lines:?}");
        assert!(lines[1].contains("layer=1 head=1"), "{lines:?}");

        let cols = "dataset,layer,head,value,n\nioi,0,0,0.5,10\nioi,0,1,-1.25e-3,10\n";
        let r = compare_tables("x.csv", &t(cols), &t(BASE), Tolerance::default());
        assert!(matches!(r.outcome, Outcome::Structure(_)));

        let dup = "k,v\na,1.0\na,2.0\n";
        let r = compare_tables("x.csv", &t(dup), &t(dup), Tolerance::default());
        assert!(matches!(r.outcome, Outcome::Structure(_)));
    }

    #[test]
    fn exit_codes_rank_structure_over_drift() {
        let mk = |outcome| TableReport {
            name: "t".into(),
            outcome,
            rows: 0,
            keys: vec![],
            values: vec![],
            worst: vec![],
        };
        let rep = |o: Vec<Outcome>| Report {
            tables: o.into_iter().map(mk).collect(),
            tolerance: Tolerance::default(),
        };
        assert_eq!(rep(vec![Outcome::Match]).exit_code(), EXIT_MATCH);
        let drift = Outcome::Drift { beyond: 1 };
        assert_eq!(
            rep(vec![Outcome::Match, drift.clone()]).exit_code(),
            EXIT_DRIFT
        );
        assert_eq!(
            rep(vec![drift, Outcome::Missing]).exit_code(),
            EXIT_STRUCTURE
        );
        assert_eq!(rep(vec![Outcome::Extra]).exit_code(), EXIT_STRUCTURE);
    }
}
