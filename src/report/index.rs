//! `index.html`: one self-contained page for a run's results: the run's summary (model,
//! device, datasets, heads, wall time), every figure embedded (`<img src>` with relative
//! links, so the directory can be moved or zipped), links to the HTML pages, the CSVs and
//! the manifest, and any notes about pictures that were not drawn.
//!
//! Owns: that page only. Must not: draw figures or decide which exist; it links what it is
//! given, and it fetches nothing (inline CSS, no script).

use std::path::{Path, PathBuf};

use super::attention::html_escape;
use crate::error::Result;
use crate::output;

/// What the index says about the run.
pub struct RunSummary {
    pub name: String,
    pub model: String,
    pub device: String,
    pub heads: usize,
    /// (name, sequences, tokens per sequence)
    pub datasets: Vec<(String, usize, usize)>,
    /// Seconds from the start of the run until the pages were written.
    pub seconds: f64,
}

/// The files the index shows, by kind; paths are inside the results directory.
#[derive(Default)]
pub struct IndexFiles {
    pub heatmaps: Vec<PathBuf>,
    /// `[[intervention]]` tables' heatmaps.
    pub interventions: Vec<PathBuf>,
    pub views: Vec<PathBuf>,
    pub pages: Vec<PathBuf>,
    pub csvs: Vec<PathBuf>,
    /// Other files written with the run (linked, not embedded), e.g. `manifest.json`.
    pub other: Vec<String>,
}

/// Percent-encodes a file name for an `href`/`src` (RFC 3986 unreserved characters stay).
pub fn url_part(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn link(name: &str) -> String {
    format!("<a href=\"{}\">{}</a>", url_part(name), html_escape(name))
}

/// `wide`: shown at its own size in a scrolling box (per-token views can be thousands of
/// pixels wide, and shrinking them to the page would make their token labels unreadable);
/// otherwise shrunk to the page width if needed.
fn figures(out: &mut String, heading: &str, files: &[PathBuf], wide: bool) {
    if files.is_empty() {
        return;
    }
    out.push_str(&format!("<h2>{}</h2>\n", html_escape(heading)));
    for f in files {
        let name = file_name(f);
        out.push_str(&format!(
            "<figure{class}>\n<figcaption>{}</figcaption>\n<a href=\"{u}\"><img src=\"{u}\" alt=\"{alt}\" loading=\"lazy\"></a>\n</figure>\n",
            link(&name),
            class = if wide { " class=\"wide\"" } else { "" },
            u = url_part(&name),
            alt = html_escape(&name),
        ));
    }
}

/// The page's HTML.
pub fn index_html(run: &RunSummary, files: &IndexFiles, notes: &[String]) -> String {
    let title = format!("hookgraph results: {}", run.name);
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n<h1>{t}</h1>\n",
        t = html_escape(&title)
    );
    let datasets: Vec<String> = run
        .datasets
        .iter()
        .map(|(n, s, l)| format!("{} ({s} sequences x {l} tokens)", html_escape(n)))
        .collect();
    out.push_str("<table class=\"summary\">\n");
    for (k, v) in [
        ("model", html_escape(&run.model)),
        ("device", html_escape(&run.device)),
        ("heads", run.heads.to_string()),
        ("datasets", datasets.join("<br>")),
        ("wall time", format!("{:.1} s", run.seconds)),
    ] {
        out.push_str(&format!("<tr><th>{k}</th><td>{v}</td></tr>\n"));
    }
    out.push_str("</table>\n");
    figures(&mut out, "Per-head scores", &files.heatmaps, false);
    figures(&mut out, "Interventions", &files.interventions, true);
    figures(&mut out, "Per-token views", &files.views, true);
    if !files.pages.is_empty() {
        out.push_str("<h2>Attention patterns</h2>\n<ul>\n");
        for p in &files.pages {
            out.push_str(&format!("<li>{}</li>\n", link(&file_name(p))));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("<h2>Tables and manifest</h2>\n<ul>\n");
    for p in &files.csvs {
        out.push_str(&format!("<li>{}</li>\n", link(&file_name(p))));
    }
    for name in &files.other {
        out.push_str(&format!("<li>{}</li>\n", link(name)));
    }
    out.push_str("</ul>\n");
    if !notes.is_empty() {
        out.push_str("<h2>Notes</h2>\n<ul>\n");
        for n in notes {
            out.push_str(&format!("<li>{}</li>\n", html_escape(n)));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// Writes `<out_dir>/index.html`.
pub fn write_index(
    out_dir: &Path,
    run: &RunSummary,
    files: &IndexFiles,
    notes: &[String],
) -> Result<PathBuf> {
    let path = out_dir.join("index.html");
    output::write_atomic(&path, index_html(run, files, notes).as_bytes())?;
    Ok(path)
}

const CSS: &str = r#"body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; }
h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table.summary { border-collapse: collapse; font-size: 14px; }
table.summary th { text-align: left; padding: 3px 16px 3px 0; color: #555; font-weight: normal;
  vertical-align: top; }
table.summary td { padding: 3px 0; }
figure { margin: 12px 0 24px; }
figcaption { font-size: 13px; margin-bottom: 6px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure.wide { overflow-x: auto; }
figure.wide img { max-width: none; }
li { margin: 3px 0; }
"#;
