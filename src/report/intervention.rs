//! Intervention heatmaps: an `[[intervention]]` table as the IOI notebooks draw it, layers x
//! heads (a `z` or `result` sweep), layers x positions with the tokens on the axis (a
//! `per_position` sweep, as `get_act_patch_resid_pre`'s figure), or one column of layers (a
//! per-layer sweep); one panel per dataset side by side, a diverging colour scale centred on 0
//! and symmetric around it, written as `<table>.svg` next to `<table>.csv`.
//!
//! Owns: recognising an intervention table (it has `loss_orig` or `logit_diff_orig`), which
//! value its picture shows ([`shown_value`]: `recovered` for patching, else the loss
//! `increase`, else the change of the logit difference), reading it into a grid
//! ([`intervention_grid`]) and drawing it ([`intervention_svg`]). Must not: compute the
//! values (they come from the table) or decide which interventions run.
//!
//! The functions take a table as the run hands it to the report (one dataset's rows, no
//! `dataset` column) or as its CSV holds it (a `dataset` column first, every dataset's rows):
//! [`split_by_dataset`] turns the second into the first. Cell values are written in a
//! monospace font and everything else in sans-serif, as in [`super::heatmap`].

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::draw::{self, Area};
use super::heatmap::{column, index_of};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::output::{self, Table, Value};

const MARGIN: u32 = 8;
const Y_LABEL: u32 = 56;
/// Axis title and integer ticks under a heads grid.
const X_LABEL: u32 = 44;
const CAPTION: u32 = 25;
const TITLE: u32 = 40;
const TITLE_PX: f64 = 18.0;
const CELL_PX: f64 = 12.0;
/// Token labels under a positions grid (written downwards).
const TOKEN_PX: f64 = 12.0;
/// Above this many columns a grid's cells carry no numbers (they would not fit a readable
/// width); the colour and the colour bar still give the value.
const MAX_LABELLED_COLUMNS: usize = 40;
/// Tokens on the axis are cut (with an ellipsis) past this many characters.
const MAX_TOKEN_CHARS: usize = 14;

/// How a table's rows are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `layer,head`: layers x heads.
    Heads,
    /// `layer,pos`: layers x positions, the tokens on the axis.
    Positions,
    /// `layer`: one column of layers.
    Layers,
}

impl Layout {
    /// The layout of an intervention table, from its key columns.
    pub fn of(table: &Table) -> Result<Layout> {
        let has = |c: &str| table.col(c).is_some();
        match (has("layer"), has("head"), has("pos")) {
            (true, true, false) => Ok(Layout::Heads),
            (true, false, true) => Ok(Layout::Positions),
            (true, false, false) => Ok(Layout::Layers),
            _ => Err(Error::Other(format!(
                "table {}: an intervention table is keyed by layer,head or layer,pos or layer (has: {})",
                table.name,
                table.columns.join(", ")
            ))),
        }
    }
}

/// Whether `table` is an intervention table (`<name>.csv` of an `[[intervention]]`).
pub fn is_intervention_table(table: &Table) -> bool {
    table.col("loss_orig").is_some() || table.col("logit_diff_orig").is_some()
}

/// What an intervention table's picture shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// A column as it is (`recovered`, `increase`).
    Column(String),
    /// `logit_diff - logit_diff_orig`: how the intervention moved the logit difference.
    LogitDiffChange,
}

impl Shown {
    /// The colour bar's caption.
    pub fn label(&self) -> &str {
        match self {
            Shown::Column(c) => c,
            Shown::LogitDiffChange => "logit_diff change",
        }
    }

    fn read(&self, table: &Table, row: &[Value]) -> Result<f64> {
        let num = |name: &str| -> Result<f64> {
            let c = column(table, name)?;
            Ok(row.get(c).map_or(f64::NAN, draw::cell_number))
        };
        match self {
            Shown::Column(c) => num(c),
            Shown::LogitDiffChange => Ok(num("logit_diff")? - num("logit_diff_orig")?),
        }
    }
}

/// The value an intervention table's picture shows: `recovered` (patching: the share of the
/// logit difference the patch restores, as the IOI notebooks draw it), else `increase` (the
/// loss increase), else the change of the logit difference (`measure = ["logit_diff"]`).
pub fn shown_value(table: &Table) -> Option<Shown> {
    if table.col("recovered").is_some() {
        Some(Shown::Column("recovered".into()))
    } else if table.col("increase").is_some() {
        Some(Shown::Column("increase".into()))
    } else if table.col("logit_diff").is_some() && table.col("logit_diff_orig").is_some() {
        Some(Shown::LogitDiffChange)
    } else {
        None
    }
}

/// A table as its CSV holds it (a `dataset` column, every dataset's rows) split into one
/// table per dataset without that column, in the order datasets first appear. A table with
/// no `dataset` column is returned whole under `default`.
pub fn split_by_dataset(table: &Table, default: &str) -> Vec<(String, Table)> {
    let Some(d) = table.col("dataset") else {
        return vec![(default.to_string(), table.clone())];
    };
    let mut out: Vec<(String, Table)> = Vec::new();
    let columns: Vec<String> = table
        .columns
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != d)
        .map(|(_, c)| c.clone())
        .collect();
    for row in &table.rows {
        let name = row.get(d).map(Value::to_string).unwrap_or_default();
        let rest: Vec<Value> = row
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != d)
            .map(|(_, v)| v.clone())
            .collect();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => t.rows.push(rest),
            None => {
                let mut t = table.clone();
                t.columns = columns.clone();
                t.rows = vec![rest];
                out.push((name, t));
            }
        }
    }
    out
}

/// One dataset's grid: `cells[layer][column]` (a head, a position, or the one column of a
/// per-layer table), `None` where the table has no row; the columns' labels.
pub struct InterventionGrid {
    pub dataset: String,
    pub cells: Vec<Vec<Option<f64>>>,
    /// Under each column: the head or position number, or the position's token.
    pub columns: Vec<String>,
}

/// Reads one dataset's intervention table into a grid of `shown` values. `n_heads` sizes a
/// heads grid; a positions grid is as wide as the table's largest `pos` + 1, labelled with
/// `tokens` (the dataset's first sequence, as the notebooks label their axis) when given.
pub fn intervention_grid(
    dataset: &str,
    table: &Table,
    shown: &Shown,
    n_layers: usize,
    n_heads: usize,
    tokens: Option<&[String]>,
) -> Result<InterventionGrid> {
    let layout = Layout::of(table)?;
    let l = column(table, "layer")?;
    let key = match layout {
        Layout::Heads => Some(column(table, "head")?),
        Layout::Positions => Some(column(table, "pos")?),
        Layout::Layers => None,
    };
    let width = match (layout, key) {
        (Layout::Heads, _) => n_heads,
        (Layout::Positions, Some(p)) => table
            .rows
            .iter()
            .map(|r| index_of(table, r, p).map(|x| x + 1))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0),
        _ => 1,
    };
    if width == 0 || n_layers == 0 {
        return Err(Error::Other(format!(
            "table {}: nothing to draw",
            table.name
        )));
    }
    let mut cells = vec![vec![None; width]; n_layers];
    for row in &table.rows {
        let layer = index_of(table, row, l)?;
        let c = match key {
            Some(k) => index_of(table, row, k)?,
            None => 0,
        };
        let cell = cells
            .get_mut(layer)
            .and_then(|r| r.get_mut(c))
            .ok_or_else(|| {
                Error::Other(format!(
                    "table {}: layer {layer}, {} {c} is outside the model ({n_layers} layers x {width})",
                    table.name,
                    if layout == Layout::Heads { "head" } else { "position" }
                ))
            })?;
        *cell = Some(shown.read(table, row)?);
    }
    let columns = (0..width)
        .map(|c| match (layout, tokens) {
            (Layout::Positions, Some(t)) => {
                let tok = t.get(c).map(|s| token_label(s)).unwrap_or_default();
                format!("{c} {tok}")
            }
            (Layout::Layers, _) => String::new(),
            _ => c.to_string(),
        })
        .collect();
    Ok(InterventionGrid {
        dataset: dataset.to_string(),
        cells,
        columns,
    })
}

/// A token as the axis shows it: newlines and tabs as symbols, spaces as `·` (a leading
/// space matters in GPT-2's tokens: " Mary" vs "Mary"), BOS as `<bos>`, long tokens cut.
pub fn token_label(token: &str) -> String {
    if token == crate::tokenizer::ENDOFTEXT {
        return "<bos>".into();
    }
    let shown: String = token
        .chars()
        .map(|c| match c {
            '\n' => '↵',
            '\t' => '⇥',
            ' ' => '·',
            c if c.is_control() => '\u{fffd}',
            c => c,
        })
        .collect();
    if shown.chars().count() > MAX_TOKEN_CHARS {
        let cut: String = shown.chars().take(MAX_TOKEN_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        shown
    }
}

/// The SVG of one intervention table: `grids` (one per dataset, same layout) side by side
/// with a shared scale from `-zmax` to `zmax`, `zmax` the largest |value| (for `recovered`
/// at least 1, so a full recovery is the darkest blue and partial ones read as fractions).
pub fn intervention_svg(
    title: &str,
    shown: &Shown,
    layout: Layout,
    grids: &[InterventionGrid],
) -> Result<String> {
    let n_layers = grids.first().map_or(0, |g| g.cells.len());
    let n_cols = grids
        .first()
        .and_then(|g| g.cells.first())
        .map_or(0, Vec::len);
    if n_layers == 0 || n_cols == 0 {
        return Err(Error::Other(format!("{title}: nothing to draw")));
    }
    let values = || {
        grids
            .iter()
            .flat_map(|g| g.cells.iter().flatten().flatten())
    };
    let mut zmax = draw::abs_max(values().copied());
    if *shown == Shown::Column("recovered".into()) {
        zmax = zmax.max(1.0);
    }
    let fmt = draw::NumberFormat::for_range(zmax);
    let labelled = n_cols <= MAX_LABELLED_COLUMNS;
    let widest = if labelled {
        values()
            .map(|&v| draw::mono_px(&fmt.format(v), CELL_PX))
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let (cell_w, x_label) = match layout {
        Layout::Heads => (54.max(widest + 8), X_LABEL),
        Layout::Layers => (70.max(widest + 8), 24),
        Layout::Positions => {
            // Tokens are written downwards under their column: the axis is as tall as the
            // longest label, a column as wide as its number.
            let tall = grids
                .iter()
                .flat_map(|g| &g.columns)
                .map(|c| draw::text_px(c, TOKEN_PX))
                .max()
                .unwrap_or(0);
            let w = if labelled { 46.max(widest + 8) } else { 22 };
            (w, tall + 34)
        }
    };
    let cell_h = 30.max(draw::MIN_PLOT_PX.div_ceil(n_layers as u32));
    let panel_w = 2 * MARGIN + Y_LABEL + n_cols as u32 * cell_w;
    let panel_h = CAPTION + 2 * MARGIN + n_layers as u32 * cell_h + x_label;
    let bar_w = draw::colour_bar_width(zmax, shown.label());
    // 10% beyond the estimate: wide fallback fonts (DejaVu Sans) must not cut the title.
    let title_w = draw::text_px(title, TITLE_PX) * 11 / 10 + 2 * MARGIN;
    let size = (
        (grids.len() as u32 * panel_w + bar_w).max(title_w),
        TITLE + panel_h,
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw::svg_err)?;
        let (top, root) = root.split_vertically(TITLE);
        draw::left_text(&top, title, MARGIN as i32, 10, TITLE_PX)?;
        let (panels, rest) = root.split_horizontally(grids.len() as u32 * panel_w);
        let (bar, _) = rest.split_horizontally(bar_w);
        for (area, grid) in panels.split_evenly((1, grids.len())).iter().zip(grids) {
            draw_panel(area, grid, layout, zmax, fmt, labelled, x_label)?;
        }
        draw::colour_bar(&bar, zmax, shown.label(), MARGIN, MARGIN + x_label)?;
        root.present().map_err(draw::svg_err)?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &Area,
    grid: &InterventionGrid,
    layout: Layout,
    zmax: f64,
    fmt: draw::NumberFormat,
    labelled: bool,
    x_label: u32,
) -> Result<()> {
    let (n_layers, n_cols) = (grid.cells.len(), grid.cells[0].len());
    let mut chart = draw::grid_chart(
        area,
        &grid.dataset,
        (n_cols, n_layers),
        MARGIN,
        (x_label, Y_LABEL),
    )?;
    match layout {
        Layout::Heads => {
            draw::grid_axes(&mut chart, (n_cols, n_layers), ("head", "layer"), 12.0, 64)?
        }
        Layout::Layers => draw::grid_axes(&mut chart, (1, n_layers), ("", "layer"), 12.0, 64)?,
        Layout::Positions => {
            // Integer layer ticks on y; the x labels are drawn by hand below, one per column,
            // reading downwards from the axis, so long tokens do not overlap.
            let y_tick = |v: &f64| draw::int_tick(-*v);
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(0)
                .y_labels(n_layers.min(64))
                .y_label_formatter(&y_tick)
                .y_desc("layer")
                .label_style((draw::LABEL_FONT, draw::px(12.0)))
                .axis_desc_style((draw::LABEL_FONT, draw::px(13.0)))
                .draw()
                .map_err(draw::svg_err)?;
            let base = area.get_base_pixel();
            let style = TextStyle {
                font: (draw::LABEL_FONT, draw::px(TOKEN_PX))
                    .into_font()
                    .transform(FontTransform::Rotate90),
                color: BLACK.to_backend_color(),
                pos: Pos::new(HPos::Left, VPos::Center),
            };
            for (c, label) in grid.columns.iter().enumerate() {
                let (x, y) = chart.backend_coord(&(c as f64, -(n_layers as f64 - 0.5)));
                area.draw_text(
                    &draw::clean_text(label),
                    &style,
                    (x - base.0, y - base.1 + 6),
                )
                .map_err(draw::svg_err)?;
            }
            let (_, h) = area.dim_in_pixel();
            let desc = "position and token (first sequence)";
            let (x0, _) = chart.backend_coord(&(-0.5, 0.0));
            draw::left_text(area, desc, x0 - base.0, h as i32 - 20, 13.0)?;
        }
    }
    let rect = |l: usize, c: usize| {
        let (x, y) = (c as f64, -(l as f64));
        [(x - 0.5, y + 0.5), (x + 0.5, y - 0.5)]
    };
    let all: Vec<(usize, usize)> = (0..n_layers)
        .flat_map(|l| (0..n_cols).map(move |c| (l, c)))
        .collect();
    let colour = |l: usize, c: usize| match grid.cells[l][c] {
        Some(v) => draw::diverging(v, zmax),
        None => draw::MISSING,
    };
    chart
        .draw_series(
            all.iter()
                .map(|&(l, c)| Rectangle::new(rect(l, c), colour(l, c).filled())),
        )
        .map_err(draw::svg_err)?;
    chart
        .draw_series(all.iter().map(|&(l, c)| Rectangle::new(rect(l, c), WHITE)))
        .map_err(draw::svg_err)?;
    if labelled {
        chart
            .draw_series(all.iter().filter_map(|&(l, c)| {
                let v = grid.cells[l][c]?;
                Some(Text::new(
                    fmt.format(v),
                    (c as f64, -(l as f64)),
                    draw::centred(draw::CELL_FONT, CELL_PX, draw::text_on(colour(l, c))),
                ))
            }))
            .map_err(draw::svg_err)?;
    }
    Ok(())
}

/// Writes `<table>.svg` for every intervention table in `tables` (the run's `(dataset,
/// table)` pairs; every dataset of a table in one figure). A positions grid's axis shows the
/// tokens of its dataset's first sequence, through `token_text`. Returns the files written
/// and, for tables that could not be drawn, why.
pub fn write_intervention_heatmaps(
    out_dir: &Path,
    tables: &[(String, &Table)],
    datasets: &[Dataset],
    n_layers: usize,
    n_heads: usize,
    token_text: &dyn Fn(u32) -> String,
    planned: &[String],
) -> (Vec<PathBuf>, Vec<String>) {
    // Only the tables the plan names: a metric's table may carry the same columns
    // (`projection_loss` has `loss_orig`), and it has a picture of its own.
    let mut names: Vec<&str> = Vec::new();
    for (_, t) in tables {
        // Heads swept `together` are keyed by a label ("0+2"), not a head: such a table
        // has no layers x heads grid to draw, and its CSV says it all.
        let together = t
            .col("head")
            .is_some_and(|c| t.rows.iter().any(|r| matches!(r[c], Value::Str(_))));
        if planned.contains(&t.name)
            && is_intervention_table(t)
            && !together
            && !names.contains(&t.name.as_str())
        {
            names.push(&t.name);
        }
    }
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for name in names {
        let parts: Vec<(String, Table)> = tables
            .iter()
            .filter(|(_, t)| t.name == name)
            .flat_map(|(d, t)| split_by_dataset(t, d))
            .collect();
        let drawn =
            draw_table(name, &parts, datasets, n_layers, n_heads, token_text).and_then(|svg| {
                let path = out_dir.join(format!("{}.svg", super::file_part(name)));
                output::write_atomic(&path, svg.as_bytes())?;
                Ok(path)
            });
        match drawn {
            Ok(p) => files.push(p),
            Err(e) => problems.push(format!("heatmap of {name}: {e}")),
        }
    }
    (files, problems)
}

/// The SVG of one intervention table given as `(dataset, rows of that dataset)` pairs.
pub fn draw_table(
    name: &str,
    parts: &[(String, Table)],
    datasets: &[Dataset],
    n_layers: usize,
    n_heads: usize,
    token_text: &dyn Fn(u32) -> String,
) -> Result<String> {
    let first = &parts
        .first()
        .ok_or_else(|| Error::Other(format!("table {name} has no rows")))?
        .1;
    let shown = shown_value(first).ok_or_else(|| {
        Error::Other(format!(
            "table {name} has none of recovered, increase, logit_diff to show"
        ))
    })?;
    let layout = Layout::of(first)?;
    let grids = parts
        .iter()
        .map(|(d, t)| {
            let tokens: Option<Vec<String>> = datasets
                .iter()
                .find(|ds| ds.name == *d)
                .filter(|_| layout == Layout::Positions)
                .map(|ds| {
                    let len = ds.lengths.first().copied().unwrap_or(0);
                    ds.tokens
                        .row(0)
                        .iter()
                        .take(len)
                        .map(|&id| token_text(id))
                        .collect()
                });
            intervention_grid(d, t, &shown, n_layers, n_heads, tokens.as_deref())
        })
        .collect::<Result<Vec<_>>>()?;
    let per = match layout {
        Layout::Heads => "per head",
        Layout::Positions => "per layer and position",
        Layout::Layers => "per layer",
    };
    intervention_svg(
        &format!("{name}: {} {per}", shown.label()),
        &shown,
        layout,
        &grids,
    )
}
