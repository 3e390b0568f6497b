//! `runner compare` on copies of the committed smoke baseline: equal, drifted, missing and
//! re-keyed tables, each with its exit code (0, 4, 5, 5) and a report that names the table
//! and the row.

use std::path::{Path, PathBuf};

use crate::common::*;

fn baseline() -> PathBuf {
    root().join("tests").join("baselines").join("smoke")
}

/// A copy of the baseline to tamper with.
fn copy_of_baseline(tmp: &Path) -> PathBuf {
    let dir = tmp.join("new");
    copy_dir(&baseline(), &dir);
    dir
}

fn compare(new: &Path, extra: &[&str]) -> (i32, String) {
    let out = runner()
        .arg("compare")
        .arg(new)
        .arg(baseline())
        .args(extra)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap(), text)
}

/// Rewrites line `line` (0 = header) of `file` with `f`.
fn edit_line(file: &Path, line: usize, f: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[line] = f(&lines[line]);
    std::fs::write(file, lines.join("\n") + "\n").unwrap();
}

#[test]
fn equal_tables_match() {
    let tmp = tempfile::tempdir().unwrap();
    let new = copy_of_baseline(tmp.path());
    // Row order is not part of the result: reverse a table's rows.
    let f = new.join("source_suppression.csv");
    let text = std::fs::read_to_string(&f).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1..].reverse();
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();

    let (code, out) = compare(&new, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("results match the baseline (5 tables)"),
        "{out}"
    );
    assert!(
        out.contains("ok      source_suppression.csv: 16 rows, keys [dataset, layer, head, n_sequences, n_undefined]"),
        "{out}"
    );
}

#[test]
fn a_drifted_value_fails_with_4_and_is_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let new = copy_of_baseline(tmp.path());
    // ioi,0,1's score moves by 1%.
    edit_line(&new.join("source_suppression.csv"), 2, |l| {
        let mut c: Vec<String> = l.split(',').map(str::to_string).collect();
        assert_eq!(&c[..3], ["ioi", "0", "1"]);
        let v: f64 = c[3].parse().unwrap();
        c[3] = format!("{}", v * 1.01);
        c.join(",")
    });
    let (code, out) = compare(&new, &[]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("DRIFT   source_suppression.csv"), "{out}");
    assert!(out.contains("dataset=ioi layer=0 head=1"), "{out}");
    assert!(out.contains("score: new"), "{out}");
    assert!(out.contains("results drifted from the baseline"), "{out}");
    // A 1% change passes a 2% relative tolerance.
    let (code, out) = compare(&new, &["--rtol", "0.02"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_missing_table_fails_with_5() {
    let tmp = tempfile::tempdir().unwrap();
    let new = copy_of_baseline(tmp.path());
    std::fs::remove_file(new.join("projection_loss.csv")).unwrap();
    let (code, out) = compare(&new, &[]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("MISSING projection_loss.csv"), "{out}");
    // A table the baseline lacks is flagged too: the gate cannot vouch for it.
    std::fs::write(new.join("projection_loss.csv.bak"), "not a table").unwrap();
    std::fs::write(new.join("extra.csv"), "k,v\na,1.0\n").unwrap();
    let (code, out) = compare(&new, &[]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("EXTRA   extra.csv"), "{out}");
}

#[test]
fn re_keyed_rows_fail_with_5_and_name_the_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let new = copy_of_baseline(tmp.path());
    // A run over other heads: ioi,0,1 became ioi,0,9.
    edit_line(&new.join("source_suppression.csv"), 2, |l| {
        l.replacen("ioi,0,1,", "ioi,0,9,", 1)
    });
    let (code, out) = compare(&new, &[]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("KEYS    source_suppression.csv"), "{out}");
    assert!(out.contains("has no match in the new table"), "{out}");
    assert!(out.contains("head=9"), "{out}");
}

#[test]
fn unreadable_input_and_bad_tolerances_fail_with_1() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out) = compare(&tmp.path().join("nope"), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nope"), "{out}");
    let new = copy_of_baseline(tmp.path());
    let (code, out) = compare(&new, &["--rtol=-1"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--rtol"), "{out}");
}
