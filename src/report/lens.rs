//! The logit-lens picture: `logit_lens_<dataset>.svg`, stages (embeddings, then every
//! layer's output) down the page × positions across, of the dataset's first sequence, each
//! cell the loss on the next token with its value written in, the input tokens along the top
//! and the targets along the bottom (the layers × positions figure of logit-lens papers).
//!
//! Owns: reading `logit_lens_per_position` and drawing it as a plain SVG. Must not: compute
//! the lens (`metrics::logit_lens` does) or draw any other table.

use std::path::{Path, PathBuf};

use super::draw;
use super::views::token_label;
use crate::error::{Error, Result};
use crate::output::{self, Table, Value};

const CELL_W: usize = 46;
const CELL_H: usize = 22;
const LEFT: usize = 190;
const TOP: usize = 70;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn col(t: &Table, name: &str) -> Result<usize> {
    t.col(name)
        .ok_or_else(|| Error::Other(format!("table {}: no column '{name}'", t.name)))
}

/// The SVG of one dataset's `logit_lens_per_position` table (its sequence 0).
pub fn lens_svg(dataset: &str, table: &Table) -> Result<String> {
    let (k_i, h_i, s_i, p_i, tok_i, tgt_i, loss_i) = (
        col(table, "layer")?,
        col(table, "hook")?,
        col(table, "seq")?,
        col(table, "pos")?,
        col(table, "token")?,
        col(table, "target")?,
        col(table, "loss")?,
    );
    let int = |v: &Value| v.as_f64().map(|x| x as usize);
    let rows: Vec<&Vec<Value>> = table
        .rows
        .iter()
        .filter(|r| int(&r[s_i]) == Some(0))
        .collect();
    let n_stage = rows
        .iter()
        .filter_map(|r| int(&r[k_i]))
        .max()
        .map_or(0, |m| m + 1);
    let n_pos = rows
        .iter()
        .filter_map(|r| int(&r[p_i]))
        .max()
        .map_or(0, |m| m + 1);
    if n_stage == 0 || n_pos == 0 {
        return Err(Error::Other(format!(
            "{}: no rows for sequence 0",
            table.name
        )));
    }
    let mut loss = vec![vec![f64::NAN; n_pos]; n_stage];
    let mut hooks = vec![String::new(); n_stage];
    let (mut toks, mut tgts) = (vec![String::new(); n_pos], vec![String::new(); n_pos]);
    for r in &rows {
        let (k, p) = (int(&r[k_i]).unwrap_or(0), int(&r[p_i]).unwrap_or(0));
        loss[k][p] = r[loss_i].as_f64().unwrap_or(f64::NAN);
        hooks[k] = draw::cell_text(&r[h_i]);
        toks[p] = token_label(&draw::cell_text(&r[tok_i]));
        tgts[p] = token_label(&draw::cell_text(&r[tgt_i]));
    }
    let zmax = draw::abs_max(loss.iter().flatten().copied());
    let (w, h) = (LEFT + n_pos * CELL_W + 20, TOP + n_stage * CELL_H + 70);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"8\" y=\"20\" font-size=\"15\">{}</text>\n",
        esc(&format!(
            "logit lens on {dataset}, sequence 0: loss on the next token per stage (rows) and position (columns)"
        ))
    );
    for (p, t) in toks.iter().enumerate() {
        let x = LEFT + p * CELL_W + CELL_W / 2;
        svg += &format!(
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"start\" transform=\"rotate(-45 {x} {})\">{}</text>\n",
            TOP - 6,
            TOP - 6,
            esc(t)
        );
        let yb = TOP + n_stage * CELL_H + 14;
        svg += &format!(
            "<text x=\"{x}\" y=\"{yb}\" text-anchor=\"end\" fill=\"#555\" transform=\"rotate(-45 {x} {yb})\">{}</text>\n",
            esc(&tgts[p])
        );
    }
    for (k, row) in loss.iter().enumerate() {
        let y = TOP + k * CELL_H;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            LEFT - 6,
            y + CELL_H / 2 + 4,
            esc(&hooks[k])
        );
        for (p, &v) in row.iter().enumerate() {
            let bg = draw::diverging(v, zmax);
            let fg = draw::text_on(bg);
            let x = LEFT + p * CELL_W;
            svg += &format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{CELL_W}\" height=\"{CELL_H}\" fill=\"rgb({},{},{})\" stroke=\"white\"/>\n",
                bg.0, bg.1, bg.2
            );
            if v.is_finite() {
                svg += &format!(
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-family=\"monospace\" fill=\"rgb({},{},{})\">{v:.2}</text>\n",
                    x + CELL_W / 2,
                    y + CELL_H / 2 + 4,
                    fg.0,
                    fg.1,
                    fg.2
                );
            }
        }
    }
    svg += &format!(
        "<text x=\"8\" y=\"{}\" fill=\"#555\">top: input tokens; bottom: the tokens predicted; colour: loss (0 white, {zmax:.2} darkest)</text>\n</svg>\n",
        h - 8
    );
    Ok(svg)
}

/// Writes `logit_lens_<dataset>.svg` for every dataset's `logit_lens_per_position` table
/// (and, under a given name, every renamed copy). Returns the files and the problems.
pub fn write_lens_pictures(
    out_dir: &Path,
    tables: &[(String, &Table)],
) -> (Vec<PathBuf>, Vec<String>) {
    let (mut files, mut problems) = (Vec::new(), Vec::new());
    for (dataset, t) in tables {
        let Some(prefix) = t.name.strip_suffix("_per_position") else {
            continue;
        };
        if t.col("hook").is_none() || t.col("target").is_none() || t.col("rank").is_none() {
            continue;
        }
        let name = format!(
            "{}_{}.svg",
            super::file_part(prefix),
            super::file_part(dataset)
        );
        match lens_svg(dataset, t).and_then(|svg| {
            let path = out_dir.join(&name);
            output::write_atomic(&path, svg.as_bytes())?;
            Ok(path)
        }) {
            Ok(p) => files.push(p),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    (files, problems)
}
