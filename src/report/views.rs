//! Per-token views (the notebook's `investigate_a_few_heads`): for a `[[view]]`, one panel
//! per head, rows = sequences, columns = positions, each cell coloured by the metric's
//! per-position value (diverging, centred on 0) and labelled with its token.
//!
//! Owns: checking `[[view]]` entries against the spec and the run's heads
//! ([`check_views`], called by `runner::validate` and before a run starts), the default view
//! (the 3 most negative heads of `source_suppression` on the first dataset), and drawing
//! `view_<metric>_<dataset>.svg` from the `<metric>_per_position` table. Must not: compute
//! values (they come from the metric's table) or change the spec's schema.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::draw::{self, Area};
use super::heatmap::{column, index_of};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::metrics::BUILTINS;
use crate::output::{self, Table, Value};
use crate::spec::{parse_heads, Heads, LoadedSpec};
use crate::tokenizer::ENDOFTEXT;

/// Sequences a view shows when `sequences` is not given (the notebook's batch of 10).
pub const DEFAULT_SEQUENCES: usize = 10;
/// Heads in the default view.
pub const DEFAULT_HEADS: usize = 3;
/// The metric a view shows when `metric` is not given, and the one the default view uses.
pub const DEFAULT_METRIC: &str = "source_suppression";
/// Token labels longer than this are cut (with an ellipsis) so cells stay a readable width.
const MAX_LABEL_CHARS: usize = 12;

/// A `[[view]]` with its defaults filled in and its heads checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedView {
    /// The metric's name in the run (its `name`, or its `kind`).
    pub metric: String,
    pub dataset: String,
    /// In the order the view lists them.
    pub heads: Vec<(usize, usize)>,
    pub sequences: usize,
}

impl ResolvedView {
    /// The table the view reads.
    pub fn table_name(&self) -> String {
        format!("{}_per_position", self.metric)
    }

    /// `view_<metric>_<dataset>.svg`, with characters unsafe in file names replaced.
    pub fn file_name(&self) -> String {
        format!(
            "view_{}_{}.svg",
            super::file_part(&self.metric),
            super::file_part(&self.dataset)
        )
    }
}

/// Every `[[metric]]`'s name in the run (as the runner names them) and its built-in kind.
fn spec_metrics(spec: &LoadedSpec) -> Vec<(String, Option<String>)> {
    spec.spec
        .metrics
        .iter()
        .map(|m| {
            let kind = m.kind.as_ref().map(|k| k.get_ref().clone());
            let name = m
                .name
                .clone()
                .or_else(|| kind.clone())
                .or_else(|| m.plugin.as_ref().map(|p| p.get_ref().clone()))
                .unwrap_or_default();
            (name, kind)
        })
        .collect()
}

/// The columns a plugin's per-position table needs for a view (the built-ins' layout).
pub const PER_POSITION_COLUMNS: [&str; 6] = ["layer", "head", "seq", "pos", "token", "value"];

/// The index of the plugin `[[metric]]` a view's `metric` names, if any.
fn plugin_metric(spec: &LoadedSpec, metric: &str) -> Option<usize> {
    spec.spec.metrics.iter().position(|m| {
        m.plugin.as_ref().is_some_and(|p| {
            m.name.as_deref() == Some(metric)
                || (m.name.is_none() && p.get_ref() == metric)
                || (m.name.is_none()
                    && crate::plugin::describe(p.get_ref(), &spec.dir())
                        .is_ok_and(|info| info.name == metric))
        })
    })
}

/// For a view of a plugin metric: the stem (`<table>` less `_per_position`) of the
/// per-position table the run writes for it, so the view reads that table. A plugin that
/// cannot be loaded, or declares no `*_per_position` table with the columns
/// [`PER_POSITION_COLUMNS`], is an error at the `[[metric]]`'s `plugin` key (file, line and
/// column), before anything runs: a view never silently draws nothing.
fn plugin_view_table(spec: &LoadedSpec, metric: &str, view: usize) -> Result<Option<String>> {
    let Some(i) = plugin_metric(spec, metric) else {
        return Ok(None);
    };
    let m = &spec.spec.metrics[i];
    let plugin = m.plugin.as_ref().expect("a plugin metric");
    let err = |why: String| {
        spec.metric_error(
            i,
            "plugin",
            format!("[[view]] #{} shows metric '{metric}', but {why}", view + 1),
        )
    };
    let info = crate::plugin::describe(plugin.get_ref(), &spec.dir())
        .map_err(|e| err(format!("its plugin cannot be loaded: {e}")))?;
    let given = m.name.clone().unwrap_or_else(|| info.name.clone());
    let names = output::TableNames {
        own: info.name.clone(),
        given,
        declared: info.tables.clone(),
    };
    let found = info
        .tables
        .iter()
        .zip(&info.table_columns)
        .find(|(t, cols)| {
            t.ends_with("_per_position")
                && PER_POSITION_COLUMNS
                    .iter()
                    .all(|c| cols.iter().any(|x| x == c))
        });
    let Some((table, _)) = found else {
        return Err(err(format!(
            "plugin '{}' declares no per-position table (a table named `<name>_per_position` with the columns {}; its tables: {})",
            info.name,
            PER_POSITION_COLUMNS.join(", "),
            info.tables.join(", ")
        )));
    };
    let written = names.rename(table);
    Ok(Some(
        written
            .strip_suffix("_per_position")
            .unwrap_or(&written)
            .to_string(),
    ))
}

/// Checks every `[[view]]` against the spec and the run's heads, and fills in defaults:
/// an unknown metric or dataset, a metric with no per-position table, a head not among the
/// run's heads, or two views that would write the same file are errors before anything runs.
pub fn check_views(
    spec: &LoadedSpec,
    run_heads: &[(usize, usize)],
    n_layers: usize,
    n_heads: usize,
) -> Result<Vec<ResolvedView>> {
    let metrics = spec_metrics(spec);
    let mut out: Vec<ResolvedView> = Vec::new();
    for (i, v) in spec.spec.views.iter().enumerate() {
        let at = |msg: String| spec.error(format!("[[view]] #{}: {msg}", i + 1));
        let requested = v.metric.clone().unwrap_or_else(|| DEFAULT_METRIC.into());
        // A plugin is named in a view by its `name`, its declared name or its `plugin`
        // string; the view reads the per-position table its descriptor declares.
        let (metric, kind) = if let Some(stem) = plugin_view_table(spec, &requested, i)? {
            (stem, None)
        } else if let Some((n, kind)) = metrics.iter().find(|(n, _)| *n == requested) {
            (n.clone(), kind.clone())
        } else {
            let known: Vec<&str> = metrics.iter().map(|(n, _)| n.as_str()).collect();
            return Err(at(format!(
                "metric '{requested}' is not a [[metric]] of this spec (its metrics: {})",
                known.join(", ")
            )));
        };
        // A weight metric's view asks for a per-token CSV, not a picture ([`weight_view_heads`]).
        if kind
            .as_deref()
            .is_some_and(crate::metrics::is_weight_metric)
        {
            continue;
        }
        // A built-in must write a per-position table (a plugin's was found above).
        if let Some(kind) = kind {
            let per_position = format!("{kind}_per_position");
            let has = BUILTINS
                .iter()
                .any(|b| b.name == kind && b.tables.contains(&per_position.as_str()));
            if !has {
                let able: Vec<&str> = BUILTINS
                    .iter()
                    .filter(|b| b.tables.iter().any(|t| t.ends_with("_per_position")))
                    .map(|b| b.name)
                    .collect();
                return Err(at(format!(
                    "metric '{metric}' ({kind}) has no per-position values to show; views can show: {}",
                    able.join(", ")
                )));
            }
        }
        let dataset = match &v.dataset {
            Some(d) => {
                if !spec.spec.datasets.iter().any(|s| &s.name == d) {
                    let known: Vec<&str> =
                        spec.spec.datasets.iter().map(|s| s.name.as_str()).collect();
                    return Err(at(format!(
                        "dataset '{d}' is not a [[dataset]] of this spec (its datasets: {})",
                        known.join(", ")
                    )));
                }
                d.clone()
            }
            None => spec.spec.datasets[0].name.clone(),
        };
        if v.heads.is_empty() {
            return Err(at(
                "`heads` is empty: name the heads to show, e.g. [\"9.9\", \"10.7\"]".into(),
            ));
        }
        let mut heads: Vec<(usize, usize)> = Vec::new();
        for item in &v.heads {
            let parsed =
                parse_heads(&Heads::List(vec![item.clone()]), n_layers, n_heads).map_err(&at)?;
            for lh in parsed {
                if !run_heads.contains(&lh) {
                    return Err(at(format!(
                        "head {}.{} is not among the run's heads (add it to the spec's `heads`)",
                        lh.0, lh.1
                    )));
                }
                if !heads.contains(&lh) {
                    heads.push(lh);
                }
            }
        }
        let sequences = v.sequences.unwrap_or(DEFAULT_SEQUENCES);
        if sequences == 0 {
            return Err(at("`sequences` must be at least 1".into()));
        }
        let view = ResolvedView {
            metric,
            dataset,
            heads,
            sequences,
        };
        if let Some(j) = out.iter().position(|o| o.file_name() == view.file_name()) {
            return Err(at(format!(
                "it shows metric '{}' on dataset '{}' like [[view]] #{}: merge their heads into one view",
                view.metric,
                view.dataset,
                j + 1
            )));
        }
        out.push(view);
    }
    Ok(out)
}

/// The picture file names the views will write, planned before compute: the `[[view]]`s'
/// (already checked) and, for a spec without views, the default view's (its heads are
/// only known after the run, its file name is not).
pub fn planned_view_files(spec: &LoadedSpec, views: &[ResolvedView]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = views
        .iter()
        .map(|v| {
            (
                v.file_name(),
                format!("the view of '{}' on '{}'", v.metric, v.dataset),
            )
        })
        .collect();
    if spec.spec.views.is_empty() {
        let default = spec_metrics(spec)
            .into_iter()
            .find(|(_, k)| k.as_deref() == Some(DEFAULT_METRIC));
        if let (Some((metric, _)), Some(d)) = (default, spec.spec.datasets.first()) {
            let v = ResolvedView {
                metric,
                dataset: d.name.clone(),
                heads: Vec::new(),
                sequences: DEFAULT_SEQUENCES,
            };
            out.push((
                v.file_name(),
                format!("the default view of '{}' on '{}'", v.metric, v.dataset),
            ));
        }
    }
    out
}

/// Whether table `table`'s heatmap (`<table>.svg`) would be written over a view's picture:
/// the view's description when it would (a metric named `view_B_ioi` and the view of `B`
/// on `ioi`).
pub fn picture_clash(table: &str, view_files: &[(String, String)]) -> Option<String> {
    let svg = format!("{table}.svg");
    view_files
        .iter()
        .find(|(f, _)| *f == svg)
        .map(|(f, what)| format!("its table '{table}' would draw {f}, which {what} writes: give the metric a different `name`"))
}

/// The heads whose per-token table the weight metric named `metric` must write: those of
/// every `[[view]]` that names it (in order, without repeats). Such a view takes no
/// `dataset` or `sequences` (the metric reads no data), and its heads must be the run's.
pub fn weight_view_heads(
    spec: &LoadedSpec,
    metric: &str,
    run_heads: &[(usize, usize)],
    n_layers: usize,
    n_heads: usize,
) -> Result<Vec<(usize, usize)>> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, v) in spec.spec.views.iter().enumerate() {
        if v.metric.as_deref() != Some(metric) {
            continue;
        }
        let at = |msg: String| spec.error(format!("[[view]] #{}: {msg}", i + 1));
        if v.dataset.is_some() || v.sequences.is_some() {
            return Err(at(format!(
                "metric '{metric}' is computed from the weights: its view writes {metric}_per_token.csv and takes no `dataset` or `sequences`"
            )));
        }
        if v.heads.is_empty() {
            return Err(at(
                "`heads` is empty: name the heads, e.g. [\"10.7\"]".into()
            ));
        }
        for item in &v.heads {
            let parsed =
                parse_heads(&Heads::List(vec![item.clone()]), n_layers, n_heads).map_err(&at)?;
            for lh in parsed {
                if !run_heads.contains(&lh) {
                    return Err(at(format!(
                        "head {}.{} is not among the run's heads (add it to the spec's `heads`)",
                        lh.0, lh.1
                    )));
                }
                if !out.contains(&lh) {
                    out.push(lh);
                }
            }
        }
    }
    Ok(out)
}

/// The view made when the spec has none but runs `source_suppression`: its 3 most negative
/// heads (by the per-head table's score) on the first dataset. `None` if there is no such
/// metric or its table was not written.
pub fn default_view(spec: &LoadedSpec, tables: &[(String, &Table)]) -> Option<ResolvedView> {
    if !spec.spec.views.is_empty() {
        return None;
    }
    let (metric, _) = spec_metrics(spec)
        .into_iter()
        .find(|(_, k)| k.as_deref() == Some(DEFAULT_METRIC))?;
    let dataset = spec.spec.datasets.first()?.name.clone();
    let (_, table) = tables
        .iter()
        .find(|(d, t)| *d == dataset && t.name == metric && t.head_score.is_some())?;
    let score = table.col(table.head_score.as_deref()?)?;
    let (l, h) = (table.col("layer")?, table.col("head")?);
    let mut scored: Vec<(f64, (usize, usize))> = table
        .rows
        .iter()
        .filter_map(|r| {
            let v = r.get(score)?.as_f64()?;
            let lh = (index_of(table, r, l).ok()?, index_of(table, r, h).ok()?);
            v.is_finite().then_some((v, lh))
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let heads: Vec<(usize, usize)> = scored
        .into_iter()
        .take(DEFAULT_HEADS)
        .map(|(_, lh)| lh)
        .collect();
    (!heads.is_empty()).then_some(ResolvedView {
        metric,
        dataset,
        heads,
        sequences: DEFAULT_SEQUENCES,
    })
}

/// A token as a view's cell shows it: BOS (and padding, which is BOS) as empty, as the
/// notebook does; newlines and tabs as visible symbols; whitespace-only tokens as `␣`; long
/// tokens cut with an ellipsis.
pub fn token_label(token: &str) -> String {
    if token == ENDOFTEXT {
        return String::new();
    }
    let shown: String = token
        .chars()
        .map(|c| match c {
            '\n' => '↵',
            '\t' => '⇥',
            '\r' => '␍',
            c if c.is_control() => '\u{fffd}',
            c => c,
        })
        .collect();
    let shown = if !shown.is_empty() && shown.trim().is_empty() {
        "␣".repeat(shown.chars().count())
    } else {
        shown
    };
    if shown.chars().count() > MAX_LABEL_CHARS {
        let cut: String = shown.chars().take(MAX_LABEL_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        shown
    }
}

/// One head's panel: `values[seq][pos]`.
struct Panel {
    head: (usize, usize),
    values: Vec<Vec<Option<f64>>>,
}

/// The data of a view, read from its per-position table.
pub struct ViewData {
    panels: Vec<Panel>,
    /// `labels[seq][pos]`, already through [`token_label`].
    labels: Vec<Vec<String>>,
    /// `texts[seq][pos]`: the whole token text, for the cell's hover title.
    texts: Vec<Vec<String>>,
    /// `pad[seq][pos]`: right padding, drawn grey.
    pad: Vec<Vec<bool>>,
}

/// Reads the view's heads and first sequences out of a per-position table (columns
/// `layer`, `head`, `seq`, `pos`, `value`, and optionally `token`).
pub fn view_data(
    view: &ResolvedView,
    table: &Table,
    dataset: Option<&Dataset>,
) -> Result<ViewData> {
    let (l, h, s, p, v) = (
        column(table, "layer")?,
        column(table, "head")?,
        column(table, "seq")?,
        column(table, "pos")?,
        column(table, "value")?,
    );
    // The token's text: `token_text` (beside the id in `token`); older tables had the text
    // in `token`.
    let tok = table.col("token_text").or_else(|| table.col("token"));
    let mut n_seq = 0;
    let mut n_pos = 0;
    for row in &table.rows {
        let seq = index_of(table, row, s)?;
        if seq < view.sequences {
            n_seq = n_seq.max(seq + 1);
            n_pos = n_pos.max(index_of(table, row, p)? + 1);
        }
    }
    if n_seq == 0 || n_pos == 0 {
        return Err(Error::Other(format!("table {} has no rows", table.name)));
    }
    let mut panels: Vec<Panel> = view
        .heads
        .iter()
        .map(|&head| Panel {
            head,
            values: vec![vec![None; n_pos]; n_seq],
        })
        .collect();
    let mut labels = vec![vec![String::new(); n_pos]; n_seq];
    let mut texts = vec![vec![String::new(); n_pos]; n_seq];
    let mut is_bos = vec![vec![false; n_pos]; n_seq];
    for row in &table.rows {
        let seq = index_of(table, row, s)?;
        if seq >= n_seq {
            continue;
        }
        let pos = index_of(table, row, p)?;
        let lh = (index_of(table, row, l)?, index_of(table, row, h)?);
        let Some(panel) = panels.iter_mut().find(|pn| pn.head == lh) else {
            continue;
        };
        panel.values[seq][pos] = Some(row[v].as_f64().unwrap_or(f64::NAN));
        if let Some(Value::Str(t)) = tok.and_then(|c| row.get(c)) {
            labels[seq][pos] = token_label(t);
            texts[seq][pos] = t.clone();
            is_bos[seq][pos] = t == ENDOFTEXT;
        }
    }
    for pn in &panels {
        if pn.values.iter().flatten().all(Option::is_none) {
            return Err(Error::Other(format!(
                "table {} has no rows for head {}.{}",
                table.name, pn.head.0, pn.head.1
            )));
        }
    }
    // Padding: the dataset knows; without it, BOS tokens after a sequence's last other
    // token are padding (GPT-2 pads with BOS).
    let pad = (0..n_seq)
        .map(|seq| {
            let last = is_bos[seq].iter().rposition(|b| !b).unwrap_or(0);
            (0..n_pos)
                .map(|pos| match dataset {
                    Some(d) if seq < d.n_sequences() => d.is_pad(seq, pos),
                    _ => pos > last && is_bos[seq][pos],
                })
                .collect()
        })
        .collect();
    Ok(ViewData {
        panels,
        labels,
        texts,
        pad,
    })
}

const CELL_H: u32 = 26;
const MARGIN: u32 = 8;
const Y_LABEL: u32 = 52;
const X_LABEL: u32 = 40;
const CAPTION: u32 = 25;
const TITLE: u32 = 40;
/// Token labels are 11 px monospace: about 6.6 px a character.
const CHAR_PX: f64 = 6.8;

/// The SVG of a view: one panel per head, stacked, with a shared symmetric scale.
pub fn view_svg(view: &ResolvedView, data: &ViewData) -> Result<String> {
    let n_seq = data.labels.len();
    let n_pos = data.labels.first().map_or(0, Vec::len);
    let widest = data
        .labels
        .iter()
        .flatten()
        .map(|t| t.chars().count())
        .max()
        .unwrap_or(0);
    let cell_w = ((widest as f64 * CHAR_PX).ceil() as u32 + 10).max(36);
    let zmax = draw::abs_max(
        data.panels
            .iter()
            .flat_map(|p| p.values.iter().flatten().flatten().copied()),
    );
    let n = data.panels.len() as u32;
    let cell_h = CELL_H.max(draw::MIN_PLOT_PX.div_ceil(n * n_seq as u32));
    let panel_w = 2 * MARGIN + Y_LABEL + n_pos as u32 * cell_w;
    let panel_h = CAPTION + 2 * MARGIN + n_seq as u32 * cell_h + X_LABEL;
    let title = format!(
        "{} per position, dataset {} (first {} sequences)",
        view.metric, view.dataset, n_seq
    );
    let bar_w = draw::colour_bar_width(zmax, "value");
    // A figure wider than a browser window would put the colour bar off-screen on the
    // right: then it goes on the left, where the reading starts.
    let bar_left = panel_w + bar_w > VIEWPORT_PX;
    let title_x = MARGIN + Y_LABEL + if bar_left { bar_w } else { 0 };
    let title_w = title_x + draw::text_px(&title, 18.0) + MARGIN;
    let size = ((panel_w + bar_w).max(title_w), TITLE + n * panel_h);
    let mut svg = String::new();
    let mut hovers = Vec::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw::svg_err)?;
        let (top, root) = root.split_vertically(TITLE);
        draw::left_text(&top, &title, title_x as i32, 10, 18.0)?;
        let (panels, bar) = if bar_left {
            let (bar, rest) = root.split_horizontally(bar_w);
            (rest.split_horizontally(panel_w).0, bar)
        } else {
            let (panels, rest) = root.split_horizontally(panel_w);
            (panels, rest.split_horizontally(bar_w).0)
        };
        for (area, panel) in panels
            .split_evenly((data.panels.len(), 1))
            .iter()
            .zip(&data.panels)
        {
            hovers.extend(draw_panel(area, panel, data, zmax)?);
        }
        // One colour bar for all panels (they share the scale), from the top of the first
        // grid to the bottom of the last.
        draw::colour_bar(&bar, zmax, "value", MARGIN, MARGIN + X_LABEL)?;
        root.present().map_err(draw::svg_err)?;
    }
    draw::add_hovers(&mut svg, &hovers)?;
    Ok(svg)
}

/// The width of a browser window the views are drawn for: wider, the colour bar goes left.
pub const VIEWPORT_PX: u32 = 1400;

/// Draws one head's panel; returns every cell's hover box (head, sequence, position,
/// token and value).
fn draw_panel(area: &Area, panel: &Panel, data: &ViewData, zmax: f64) -> Result<Vec<draw::Hover>> {
    let (n_seq, n_pos) = (panel.values.len(), panel.values[0].len());
    draw::left_text(
        area,
        &format!("head {}.{}", panel.head.0, panel.head.1),
        (MARGIN + Y_LABEL) as i32,
        (MARGIN + 4) as i32,
        draw::CAPTION_PX,
    )?;
    let mut chart = ChartBuilder::on(area)
        .margin(MARGIN)
        .margin_top(MARGIN + CAPTION)
        .x_label_area_size(X_LABEL)
        .y_label_area_size(Y_LABEL)
        .build_cartesian_2d(-0.5f64..(n_pos as f64 - 0.5), -(n_seq as f64 - 0.5)..0.5f64)
        .map_err(draw::svg_err)?;
    draw::grid_axes(
        &mut chart,
        (n_pos, n_seq),
        ("position", "sequence"),
        11.0,
        40,
    )?;
    let rect = |s: usize, p: usize| {
        let (x, y) = (p as f64, -(s as f64));
        [(x - 0.5, y + 0.5), (x + 0.5, y - 0.5)]
    };
    let colour = |s: usize, p: usize| match panel.values[s][p] {
        Some(v) if !data.pad[s][p] => draw::diverging(v, zmax),
        _ => draw::MISSING,
    };
    let cells: Vec<(usize, usize)> = (0..n_seq)
        .flat_map(|s| (0..n_pos).map(move |p| (s, p)))
        .collect();
    chart
        .draw_series(
            cells
                .iter()
                .map(|&(s, p)| Rectangle::new(rect(s, p), colour(s, p).filled())),
        )
        .map_err(draw::svg_err)?;
    chart
        .draw_series(
            cells
                .iter()
                .map(|&(s, p)| Rectangle::new(rect(s, p), WHITE)),
        )
        .map_err(draw::svg_err)?;
    chart
        .draw_series(
            cells
                .iter()
                .filter(|&&(s, p)| !data.labels[s][p].is_empty())
                .map(|&(s, p)| {
                    Text::new(
                        data.labels[s][p].clone(),
                        (p as f64, -(s as f64)),
                        draw::centred(draw::CELL_FONT, 11.0, draw::text_on(colour(s, p))),
                    )
                }),
        )
        .map_err(draw::svg_err)?;
    let (l, h) = panel.head;
    let hovers = cells
        .iter()
        .map(|&(s, p)| {
            let value = match panel.values[s][p] {
                _ if data.pad[s][p] => "padding".to_string(),
                Some(v) => format!("value = {v}"),
                None => "no value".to_string(),
            };
            let title = format!(
                "head {l}.{h}, sequence {s}, position {p}, token {:?}: {value}",
                data.texts[s][p]
            );
            draw::Hover::over(&chart, rect(s, p), title)
        })
        .collect();
    Ok(hovers)
}

/// Draws every view to `view_<metric>_<dataset>.svg`. A view whose table was not written
/// (its metric failed) is skipped with a note; one that cannot be drawn is a problem.
pub fn write_views(
    out_dir: &Path,
    views: &[ResolvedView],
    tables: &[(String, &Table)],
    datasets: &[Dataset],
    notes: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for view in views {
        let name = view.table_name();
        let Some((_, table)) = tables
            .iter()
            .find(|(d, t)| *d == view.dataset && t.name == name)
        else {
            notes.push(format!(
                "view of {} on {}: not drawn, no table {name} was written for that dataset",
                view.metric, view.dataset
            ));
            continue;
        };
        let dataset = datasets.iter().find(|d| d.name == view.dataset);
        let drawn = view_data(view, table, dataset)
            .and_then(|data| view_svg(view, &data))
            .and_then(|svg| {
                let path = out_dir.join(view.file_name());
                output::write_atomic(&path, svg.as_bytes())?;
                Ok(path)
            });
        match drawn {
            Ok(p) => files.push(p),
            Err(e) => problems.push(format!("view of {} on {}: {e}", view.metric, view.dataset)),
        }
    }
    files
}

/// The heads of every view on `dataset`, in order, without repeats.
pub fn heads_on(views: &[ResolvedView], dataset: &str) -> Vec<(usize, usize)> {
    let mut seen = BTreeSet::new();
    views
        .iter()
        .filter(|v| v.dataset == dataset)
        .flat_map(|v| v.heads.iter().copied())
        .filter(|h| seen.insert(*h))
        .collect()
}
