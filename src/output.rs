//! Results on disk: CSV tables, the manifest, written atomically.
//!
//! Owns: the [`Table`] type metrics return, writing tables as CSV (`dataset` first), and the
//! run's `manifest.json`; every file is written to a temporary file in the output directory
//! and renamed into place, so a failed run never leaves a half-written file. Must not:
//! compute results or decide what a table contains.

use std::io::Write;
use std::path::{Path, PathBuf};

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
}

impl Table {
    pub fn new(name: impl Into<String>, columns: &[&str]) -> Self {
        Table {
            name: name.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            head_score: None,
        }
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

/// Writes `<dir>/<name>.csv` atomically; returns its path.
pub fn write_csv(dir: &Path, parts: &[(String, &Table)]) -> Result<PathBuf> {
    let name = &parts
        .first()
        .ok_or_else(|| Error::Other("no table".into()))?
        .1
        .name;
    let path = dir.join(format!("{name}.csv"));
    write_atomic(&path, &tables_to_csv(parts)?)?;
    Ok(path)
}

/// Writes any serialisable value as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    write_atomic(path, &bytes)
}

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
}
