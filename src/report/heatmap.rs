//! Head heatmaps: every per-head table as a layers x heads grid, one panel per dataset side
//! by side (the notebook's "IOI | Webtext" figure), written as `<table>.svg` next to
//! `<table>.csv`.
//!
//! Owns: reading a per-head table (`layer`, `head` and its `head_score` column) into a grid
//! and drawing it: a diverging colour scale centred on 0 and symmetric around it (the
//! largest |value| over all panels), each value written in its cell with the precision the
//! range needs ([`draw::NumberFormat`]: `2.97`, `0.0123`, `8.1e-4`), a title, a colour bar,
//! on a canvas as large as its content (cells as wide as their widest label, the bar as
//! wide as its caption). Must not: compute scores or choose which tables are per-head (the
//! metric marks them with `Table::per_head`).
//!
//! Cell values are drawn in a monospace font and everything else in sans-serif, so a reader
//! of the SVG (and `tests/report.rs`) can pick the cell labels out.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::draw::{self, Area};
use crate::error::{Error, Result};
use crate::output::{self, Table, Value};

const CELL_W: u32 = 54;
const CELL_H: u32 = 30;
const MARGIN: u32 = 8;
const Y_LABEL: u32 = 56;
const X_LABEL: u32 = 44;
/// What a ChartBuilder caption of [`draw::CAPTION_PX`] takes, with its padding.
const CAPTION: u32 = 25;
const TITLE: u32 = 40;
const TITLE_PX: f64 = 18.0;
/// Cell labels' font size.
const CELL_PX: f64 = 12.0;

/// One dataset's per-head values: `cells[layer][head]`, `None` where the table has no row.
pub struct HeadGrid {
    pub dataset: String,
    pub cells: Vec<Vec<Option<Value>>>,
}

/// A non-negative integer cell (`layer`, `head`, `seq`, `pos`).
pub(crate) fn index_of(table: &Table, row: &[Value], col: usize) -> Result<usize> {
    match row.get(col) {
        Some(Value::Int(i)) if *i >= 0 => Ok(*i as usize),
        other => Err(Error::Other(format!(
            "table {}: column '{}' should hold non-negative integers, found {:?}",
            table.name, table.columns[col], other
        ))),
    }
}

/// The column `name` of `table`, or an error naming both.
pub(crate) fn column(table: &Table, name: &str) -> Result<usize> {
    table.col(name).ok_or_else(|| {
        Error::Other(format!(
            "table {}: no column '{name}' (has: {})",
            table.name,
            table.columns.join(", ")
        ))
    })
}

/// Reads a per-head table into an `n_layers x n_heads` grid.
pub fn head_grid(
    dataset: &str,
    table: &Table,
    n_layers: usize,
    n_heads: usize,
) -> Result<HeadGrid> {
    let score_name = table
        .head_score
        .as_deref()
        .ok_or_else(|| Error::Other(format!("table {} is not a per-head table", table.name)))?;
    let (l, h, s) = (
        column(table, "layer")?,
        column(table, "head")?,
        column(table, score_name)?,
    );
    let mut cells = vec![vec![None; n_heads]; n_layers];
    for row in &table.rows {
        let (layer, head) = (index_of(table, row, l)?, index_of(table, row, h)?);
        let cell = cells
            .get_mut(layer)
            .and_then(|r| r.get_mut(head))
            .ok_or_else(|| {
                Error::Other(format!(
                    "table {}: head {layer}.{head} is outside the model ({n_layers} x {n_heads})",
                    table.name
                ))
            })?;
        *cell = Some(row[s].clone());
    }
    Ok(HeadGrid {
        dataset: dataset.to_string(),
        cells,
    })
}

/// The SVG of one per-head table: `grids` side by side with a shared, symmetric scale.
pub fn head_heatmap_svg(title: &str, score: &str, grids: &[HeadGrid]) -> Result<String> {
    let n_layers = grids.first().map_or(0, |g| g.cells.len());
    let n_heads = grids
        .first()
        .and_then(|g| g.cells.first())
        .map_or(0, Vec::len);
    if n_layers == 0 || n_heads == 0 {
        return Err(Error::Other(format!("{title}: nothing to draw")));
    }
    let zmax = draw::abs_max(
        grids
            .iter()
            .flat_map(|g| g.cells.iter().flatten().flatten())
            .map(draw::cell_number),
    );
    let fmt = draw::NumberFormat::for_range(zmax);
    let widest = grids
        .iter()
        .flat_map(|g| g.cells.iter().flatten().flatten())
        .map(|v| draw::mono_px(&draw::cell_label(v, fmt), CELL_PX))
        .max()
        .unwrap_or(0);
    let cell_w = CELL_W.max(widest + 8);
    let cell_h = CELL_H.max(draw::MIN_PLOT_PX.div_ceil(n_layers as u32));
    let panel_w = 2 * MARGIN + Y_LABEL + n_heads as u32 * cell_w;
    let panel_h = CAPTION + 2 * MARGIN + n_layers as u32 * cell_h + X_LABEL;
    let bar_w = draw::colour_bar_width(zmax, score);
    let title_w = draw::text_px(title, TITLE_PX) + 2 * MARGIN;
    let size = (
        (grids.len() as u32 * panel_w + bar_w).max(title_w),
        TITLE + panel_h,
    );

    let mut svg = String::new();
    let mut hovers = Vec::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw::svg_err)?;
        let root = root
            .titled(
                &draw::clean_text(title),
                (draw::LABEL_FONT, draw::px(TITLE_PX)).into_font(),
            )
            .map_err(draw::svg_err)?;
        let (panels, rest) = root.split_horizontally(grids.len() as u32 * panel_w);
        let (bar, _) = rest.split_horizontally(bar_w);
        for (area, grid) in panels.split_evenly((1, grids.len())).iter().zip(grids) {
            hovers.extend(draw_panel(area, grid, zmax, fmt, score)?);
        }
        draw::colour_bar(&bar, zmax, score, MARGIN, MARGIN + X_LABEL)?;
        root.present().map_err(draw::svg_err)?;
    }
    draw::add_hovers(&mut svg, &hovers)?;
    Ok(svg)
}

/// Draws one dataset's grid; returns every cell's hover box (value and key, the value as the
/// CSV holds it).
fn draw_panel(
    area: &Area,
    grid: &HeadGrid,
    zmax: f64,
    fmt: draw::NumberFormat,
    score: &str,
) -> Result<Vec<draw::Hover>> {
    let (n_layers, n_heads) = (grid.cells.len(), grid.cells[0].len());
    // Cells are centred on integers, so integer ticks label them; layers go down the page
    // (layer 0 on top, as `imshow` shows a matrix), hence the negated y axis.
    let mut chart = draw::grid_chart(
        area,
        &grid.dataset,
        (n_heads, n_layers),
        MARGIN,
        (X_LABEL, Y_LABEL),
    )?;
    draw::grid_axes(&mut chart, (n_heads, n_layers), ("head", "layer"), 12.0, 64)?;

    let cells: Vec<(usize, usize, &Value)> = grid
        .cells
        .iter()
        .enumerate()
        .flat_map(|(l, row)| {
            row.iter()
                .enumerate()
                .filter_map(move |(h, v)| v.as_ref().map(|v| (l, h, v)))
        })
        .collect();
    let rect = |l: usize, h: usize| {
        let (x, y) = (h as f64, -(l as f64));
        [(x - 0.5, y + 0.5), (x + 0.5, y - 0.5)]
    };
    // Heads the run did not select stay grey and unlabelled.
    chart
        .draw_series((0..n_layers).flat_map(|l| {
            (0..n_heads).map(move |h| Rectangle::new(rect(l, h), draw::MISSING.filled()))
        }))
        .map_err(draw::svg_err)?;
    chart
        .draw_series(cells.iter().map(|&(l, h, v)| {
            Rectangle::new(
                rect(l, h),
                draw::diverging(draw::cell_number(v), zmax).filled(),
            )
        }))
        .map_err(draw::svg_err)?;
    chart
        .draw_series(
            (0..n_layers)
                .flat_map(|l| (0..n_heads).map(move |h| Rectangle::new(rect(l, h), WHITE))),
        )
        .map_err(draw::svg_err)?;
    chart
        .draw_series(cells.iter().map(|&(l, h, v)| {
            let bg = draw::diverging(draw::cell_number(v), zmax);
            Text::new(
                draw::cell_label(v, fmt),
                (h as f64, -(l as f64)),
                draw::centred(draw::CELL_FONT, CELL_PX, draw::text_on(bg)),
            )
        }))
        .map_err(draw::svg_err)?;
    let hovers = (0..n_layers)
        .flat_map(|l| (0..n_heads).map(move |h| (l, h)))
        .map(|(l, h)| {
            let value = match &grid.cells[l][h] {
                Some(v) => format!("{score} = {v}"),
                None => "not selected".to_string(),
            };
            let title = format!("{}: layer {l}, head {h} ({l}.{h}): {value}", grid.dataset);
            draw::Hover::over(&chart, rect(l, h), title)
        })
        .collect();
    Ok(hovers)
}

/// Writes `<table>.svg` for every per-head table in `tables` (all datasets of a table in
/// one figure). Returns the files written and, for tables that could not be drawn, why.
pub fn write_head_heatmaps(
    out_dir: &Path,
    tables: &[(String, &Table)],
    n_layers: usize,
    n_heads: usize,
    skip: &[String],
) -> (Vec<PathBuf>, Vec<String>) {
    let mut names: Vec<&str> = Vec::new();
    for (_, t) in tables {
        // Intervention tables (`skip`, named by the plan, not guessed from their columns:
        // `projection_loss` has a `loss_orig` too) have pictures of their own
        // (`super::intervention`).
        if t.head_score.is_some() && !skip.contains(&t.name) && !names.contains(&t.name.as_str()) {
            names.push(&t.name);
        }
    }
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for name in names {
        let parts: Vec<&(String, &Table)> = tables.iter().filter(|(_, t)| t.name == name).collect();
        let score = parts[0].1.head_score.clone().unwrap_or_default();
        let drawn = parts
            .iter()
            .map(|(d, t)| head_grid(d, t, n_layers, n_heads))
            .collect::<Result<Vec<_>>>()
            .and_then(|grids| {
                let title = format!("{name}: {score} per head");
                head_heatmap_svg(&title, &score, &grids)
            })
            .and_then(|svg| {
                let path = out_dir.join(format!("{name}.svg"));
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
