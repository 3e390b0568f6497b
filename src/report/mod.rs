//! Pictures and pages of a run, for researchers who would rather look than read a CSV.
//!
//! Owns: everything a run writes besides its CSVs and manifest, all through
//! [`output::write_atomic`](crate::output::write_atomic):
//! - [`heatmap`]: `<table>.svg` for every per-head table (layers x heads, one panel per
//!   dataset, the notebook's "IOI | Webtext" figure);
//! - [`intervention`]: `<table>.svg` for every `[[intervention]]` table (layers x heads, or
//!   layers x positions with the tokens on the axis, as the IOI notebooks draw `recovered`);
//! - [`views`]: `view_<metric>_<dataset>.svg` per `[[view]]` (the notebook's
//!   `investigate_a_few_heads`), and checking `[[view]]` entries before a run;
//! - [`lens`]: `logit_lens_<dataset>.svg`, stages x positions with the tokens on the axis;
//! - [`attention`]: `attention_<dataset>.html`, the heads of that dataset's views on its
//!   first sequences, one at a time (CircuitsVis's `attention_patterns`), from small forward passes;
//! - [`index`]: `index.html`, linking all of it;
//! - [`prompt`]: TL's `test_prompt` (used by `runner prompt`, not by runs).
//!
//! The runner calls [`write_all`] once, after the CSVs are written. A picture that cannot
//! be drawn is reported, never a reason to lose the run's other files. Must not: compute
//! metrics, change the run's hook graph or its tables, or read the spec's schema beyond
//! `[[view]]`.

pub mod attention;
pub mod draw;
pub mod heatmap;
pub mod index;
pub mod intervention;
pub mod lens;
pub mod prompt;
pub mod views;

use std::path::{Path, PathBuf};

use crate::data::Dataset;
use crate::model::LoadedModel;
use crate::output::Table;
use crate::seam::SeamDevice;
use crate::spec::LoadedSpec;

pub use views::{check_views, ResolvedView};

/// What a run hands the report.
pub struct ReportInput<'a, D: SeamDevice> {
    pub out_dir: &'a Path,
    pub spec: &'a LoadedSpec,
    pub loaded: &'a LoadedModel<D>,
    /// The run's heads, sorted.
    pub heads: &'a [(usize, usize)],
    pub datasets: &'a [Dataset],
    /// The `[[intervention]]` tables, as the plan named them.
    pub intervention_tables: &'a [String],
    /// Every table written as CSV, with its dataset (per-head and per-position alike).
    pub tables: &'a [(String, &'a Table)],
    /// The CSV files written.
    pub csv_files: &'a [PathBuf],
    /// Where the run ran (`cpu`, `cuda`).
    pub device: String,
    /// Seconds since the run started.
    pub seconds: f64,
}

/// What [`write_all`] wrote, and what went wrong.
#[derive(Debug, Default)]
pub struct ReportOutput {
    pub files: Vec<PathBuf>,
    /// Pictures that could not be drawn or written, one sentence each.
    pub problems: Vec<String>,
}

/// A name made safe for a file name: ASCII letters, digits, `-`, `_`, `.`; anything else
/// becomes `_` (dataset and metric names come from the spec).
pub fn file_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes every picture and page of a run into `out_dir`, `index.html` last; returns the
/// files written. Views were checked before the run ([`check_views`]); a view whose
/// metric failed is skipped with a note on the index page.
pub fn write_all<D: SeamDevice>(input: &ReportInput<D>) -> ReportOutput {
    let cfg = input.loaded.cfg();
    let mut out = ReportOutput::default();
    let mut notes = Vec::new();
    let (heatmaps, problems) = heatmap::write_head_heatmaps(
        input.out_dir,
        input.tables,
        cfg.n_layers,
        cfg.n_heads,
        input.intervention_tables,
    );
    out.problems.extend(problems);
    let (lens, problems) = lens::write_lens_pictures(input.out_dir, input.tables);
    out.problems.extend(problems);
    let heatmaps: Vec<PathBuf> = heatmaps.into_iter().chain(lens).collect();

    let token_text = |id: u32| match &input.loaded.tokenizer {
        Some(t) => t.decode_one(id),
        None => format!("#{id}"),
    };
    let (interventions, problems) = intervention::write_intervention_heatmaps(
        input.out_dir,
        input.tables,
        input.datasets,
        cfg.n_layers,
        cfg.n_heads,
        &token_text,
        input.intervention_tables,
    );
    out.problems.extend(problems);

    let mut views = match check_views(input.spec, input.heads, cfg.n_layers, cfg.n_heads) {
        Ok(v) => v,
        Err(e) => {
            out.problems.push(e.to_string());
            Vec::new()
        }
    };
    views.extend(views::default_view(input.spec, input.tables));
    let view_files = views::write_views(
        input.out_dir,
        &views,
        input.tables,
        input.datasets,
        &mut notes,
        &mut out.problems,
    );

    let mut pages = Vec::new();
    for dataset in input.datasets {
        let heads = views::heads_on(&views, &dataset.name);
        if heads.is_empty() {
            continue;
        }
        // As many sequences as the dataset's views show.
        let sequences = views
            .iter()
            .filter(|v| v.dataset == dataset.name)
            .map(|v| v.sequences)
            .max()
            .unwrap_or(1);
        match attention::write_attention_page(
            input.out_dir,
            &input.loaded.model,
            dataset,
            &heads,
            sequences,
            &token_text,
        ) {
            Ok(p) => pages.push(p),
            Err(e) => out
                .problems
                .push(format!("attention page of {}: {e}", dataset.name)),
        }
    }

    let summary = index::RunSummary {
        name: input.spec.spec.name.clone(),
        model: input.loaded.files.dir.display().to_string(),
        device: input.device.clone(),
        heads: input.heads.len(),
        datasets: input
            .datasets
            .iter()
            .map(|d| (d.name.clone(), d.n_sequences(), d.seq_len()))
            .collect(),
        seconds: input.seconds,
    };
    notes.extend(out.problems.iter().cloned());
    let files = index::IndexFiles {
        heatmaps: heatmaps.clone(),
        interventions: interventions.clone(),
        views: view_files.clone(),
        pages: pages.clone(),
        csvs: input.csv_files.to_vec(),
        // The runner writes the manifest right after the report.
        other: vec!["manifest.json".into()],
    };
    out.files.extend(heatmaps);
    out.files.extend(interventions);
    out.files.extend(view_files);
    out.files.extend(pages);
    match index::write_index(input.out_dir, &summary, &files, &notes) {
        Ok(p) => out.files.push(p),
        Err(e) => out.problems.push(format!("index.html: {e}")),
    }
    out
}
