//! Results on disk: CSV tables, the manifest, and the whole-run swap.
//!
//! Owns: the [`Table`] type metrics return, finding non-finite cells in one
//! ([`Table::non_finite`]), writing tables as CSV (`dataset` first), the run's
//! `manifest.json`, and the file names a run may use ([`file_in`]). The output directory
//! itself (what a results directory is, its lock, the staging directory and the swap) is
//! [`crate::outdir`]'s, re-exported here. Must not: compute results or decide what a table
//! contains.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// One cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Float(f64),
    Str(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            // Shortest representation that round-trips an f32: CSV readers get the exact value.
            Value::Float(x) if x.is_nan() => f.write_str("NaN"),
            Value::Float(x) if x.is_infinite() => {
                f.write_str(if *x > 0.0 { "inf" } else { "-inf" })
            }
            Value::Float(x) => write!(f, "{}", *x as f32),
            Value::Str(s) => f.write_str(s),
        }
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(v as i64)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v as i64)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(v as f64)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_string())
    }
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(x) => Some(*x),
            Value::Str(_) => None,
        }
    }
}

/// A table a metric produces for one dataset. The runner prepends the `dataset` column and
/// concatenates the same table across datasets into `<name>.csv`.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// File stem: `source_suppression`, `source_suppression_per_position`, ...
    pub name: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// For per-head tables (with `layer` and `head` columns): the column the summary and
    /// heatmaps show.
    pub head_score: Option<String>,
    /// Columns where NaN means "undefined for this sequence" (metrics.md's 0/0), counted by
    /// the metric in another column; NaN there is a value, not a failure.
    #[serde(skip)]
    pub undefined_as_nan: Vec<String>,
}

/// Where a table holds values that are not finite numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NonFinite {
    /// Non-finite cells, not counting allowed undefined NaNs.
    pub count: usize,
    /// 0-based row of the first one (in this table), its column and value.
    #[serde(skip)]
    pub first_row: usize,
    pub column: String,
    pub value: String,
    /// The first row, rendered `column=value, ...`.
    pub row: String,
}

impl Table {
    pub fn new(name: impl Into<String>, columns: &[&str]) -> Self {
        Table {
            name: name.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            head_score: None,
            undefined_as_nan: Vec::new(),
        }
    }

    /// Marks `column` as one where NaN stands for an undefined (and counted) sequence.
    pub fn undefined_as_nan(mut self, column: &str) -> Self {
        self.undefined_as_nan.push(column.to_string());
        self
    }

    /// The NaN and infinite cells of the table, except NaN in `undefined_as_nan` columns;
    /// `None` when every number is finite.
    pub fn non_finite(&self) -> Option<NonFinite> {
        let allowed: Vec<bool> = self
            .columns
            .iter()
            .map(|c| self.undefined_as_nan.contains(c))
            .collect();
        let mut found: Option<NonFinite> = None;
        for (r, row) in self.rows.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let Value::Float(x) = v else { continue };
                if x.is_finite() || (x.is_nan() && allowed.get(c).copied().unwrap_or(false)) {
                    continue;
                }
                match &mut found {
                    Some(f) => f.count += 1,
                    None => {
                        found = Some(NonFinite {
                            count: 1,
                            first_row: r,
                            column: self.columns.get(c).cloned().unwrap_or_default(),
                            value: v.to_string(),
                            row: self
                                .columns
                                .iter()
                                .zip(row)
                                .map(|(c, v)| format!("{c}={v}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                        })
                    }
                }
            }
        }
        found
    }

    /// Marks this as a per-head table whose headline value is `column`.
    pub fn per_head(mut self, column: &str) -> Self {
        self.head_score = Some(column.to_string());
        self
    }

    pub fn push(&mut self, row: Vec<Value>) {
        debug_assert_eq!(row.len(), self.columns.len(), "table {}", self.name);
        self.rows.push(row);
    }

    /// The index of a column.
    pub fn col(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".hookgraph-").suffix(".tmp");
    // Results are for sharing: rw-r--r--, not the 0600 of a temporary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Serialises tables with the same name (one per dataset) as one CSV, `dataset` first.
pub fn tables_to_csv(parts: &[(String, &Table)]) -> Result<Vec<u8>> {
    let first = parts
        .first()
        .ok_or_else(|| Error::Other("no table to write".into()))?
        .1;
    let mut w = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::Other(format!("csv: {e}"));
    let mut header = vec!["dataset".to_string()];
    header.extend(first.columns.iter().cloned());
    w.write_record(&header).map_err(csv_err)?;
    for (dataset, table) in parts {
        if table.columns != first.columns {
            return Err(Error::Other(format!(
                "table {}: columns differ between datasets",
                table.name
            )));
        }
        for row in &table.rows {
            let mut rec = vec![dataset.clone()];
            rec.extend(row.iter().map(|v| v.to_string()));
            w.write_record(&rec).map_err(csv_err)?;
        }
    }
    w.into_inner()
        .map_err(|e| Error::Other(format!("csv: {e}")))
}

/// The names a metric's tables get in the results. A metric given its own `name` renames
/// its tables, so one metric (built-in or plugin) can run twice with different options: the
/// table named like its first declared table becomes `name`, tables that start with that
/// name keep their suffix (`source_suppression_per_position` -> `ss_neg_per_position`), and
/// any other table becomes `<name>_<table>`.
#[derive(Debug, Clone)]
pub struct TableNames {
    /// The metric's own name (built-in kind or plugin name).
    pub own: String,
    /// The name the spec gives it (its own unless `name` is set).
    pub given: String,
    /// The tables it declares, before renaming.
    pub declared: Vec<String>,
}

impl TableNames {
    pub fn rename(&self, table: &str) -> String {
        if self.given == self.own {
            return table.to_string();
        }
        let primary = self
            .declared
            .first()
            .map_or(self.own.as_str(), String::as_str);
        match table.strip_prefix(primary) {
            Some(rest) => format!("{}{rest}", self.given),
            None => format!("{}_{table}", self.given),
        }
    }

    /// Every declared table's name in the results.
    pub fn planned(&self) -> Vec<String> {
        self.declared.iter().map(|t| self.rename(t)).collect()
    }
}

/// `dir/name`, checked to stay inside `dir`: `name` must be one plain path component (no
/// separator, not empty, not `.` or `..`, not absolute). Every file a run writes gets its
/// path from here or from a name checked the same way ([`crate::spec::check_name`]).
pub fn file_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(n)), None)
            if n == std::ffi::OsStr::new(name) && !name.contains(['/', '\\']) =>
        {
            Ok(dir.join(name))
        }
        _ => Err(Error::Other(format!(
            "refusing to write {name:?}: not a plain file name inside {}",
            dir.display()
        ))),
    }
}

/// Writes `<dir>/<name>.csv` atomically; returns its path.
pub fn write_csv(dir: &Path, parts: &[(String, &Table)]) -> Result<PathBuf> {
    let name = &parts
        .first()
        .ok_or_else(|| Error::Other("no table".into()))?
        .1
        .name;
    let path = file_in(dir, &format!("{name}.csv"))?;
    write_atomic(&path, &tables_to_csv(parts)?)?;
    Ok(path)
}

/// Writes any serialisable value as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    write_atomic(path, &bytes)
}

pub use crate::outdir::{abandon_staging, Committed, Staging, Target};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_dataset_column_and_exact_floats() {
        let mut t = Table::new("x", &["layer", "score"]);
        t.push(vec![1usize.into(), 0.1f32.into()]);
        let csv = tables_to_csv(&[("ioi".into(), &t)]).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "dataset,layer,score\nioi,1,0.1\n"
        );
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        write_atomic(&p, b"hi").unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.csv")]);
    }

    #[test]
    fn file_names_stay_inside_the_directory() {
        let d = Path::new("/r");
        assert_eq!(file_in(d, "a.csv").unwrap(), PathBuf::from("/r/a.csv"));
        for bad in ["", ".", "..", "../a", "a/b", "/etc/passwd", "a\\b", "./a"] {
            assert!(file_in(d, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn non_finite_cells_are_found_except_undefined_nans() {
        let mut t = Table::new("x", &["seq", "value"]);
        t.push(vec![0usize.into(), 1.0f32.into()]);
        assert_eq!(t.non_finite(), None);
        t.push(vec![1usize.into(), f32::NAN.into()]);
        t.push(vec![2usize.into(), f32::INFINITY.into()]);
        let f = t.non_finite().unwrap();
        assert_eq!((f.count, f.first_row, f.column.as_str()), (2, 1, "value"));
        assert_eq!(f.row, "seq=1, value=NaN");
        // NaN marked as undefined is a value; infinity never is.
        let t = t.undefined_as_nan("value");
        let f = t.non_finite().unwrap();
        assert_eq!((f.count, f.first_row, f.value.as_str()), (1, 2, "inf"));
    }

    #[test]
    fn renamed_metrics_rename_all_their_tables() {
        let names = |own: &str, given: &str, declared: &[&str]| TableNames {
            own: own.into(),
            given: given.into(),
            declared: declared.iter().map(|t| t.to_string()).collect(),
        };
        let ss = names(
            "source_suppression",
            "ss_neg",
            &["source_suppression", "source_suppression_per_position"],
        );
        assert_eq!(ss.planned(), ["ss_neg", "ss_neg_per_position"]);
        // A plugin whose tables are not prefixed by its own name.
        let p = names(
            "hg_attention_entropy",
            "ent",
            &["attention_entropy", "other"],
        );
        assert_eq!(p.planned(), ["ent", "ent_other"]);
        // Not renamed: as declared.
        let same = names("loss", "loss", &["loss"]);
        assert_eq!(same.planned(), ["loss"]);
        assert_eq!(same.rename("undeclared"), "undeclared");
    }
}
