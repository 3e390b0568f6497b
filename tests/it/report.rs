//! The report's pictures and pages, read back the way a machine can: heatmap cells against
//! the CSV, token labels in the per-token view, `test_prompt` against a direct softmax, the
//! attention page's data against a forward pass, and the index linking every file.
//! No browser needed (`scripts/check_pages.sh` renders the pages with Chromium by hand).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::data::{unpadded_lengths, Dataset};
use hookgraph::hooks::{HookFilter, Hooks};
use hookgraph::metrics::{self, BatchView, RunContext};
use hookgraph::model::{self, CheckpointFiles, LoadedModel, Processing};
use hookgraph::output::{self, Table, Value};
use hookgraph::report::{self, attention, draw, prompt, views, ReportInput};
use hookgraph::spec::LoadedSpec;
use hookgraph::tokenizer::{GptTokenizer, ENDOFTEXT};
use ndarray::Array2;

fn load(ckpt: &str) -> LoadedModel<Cpu> {
    let files = CheckpointFiles::in_dir(&fixture(ckpt)).unwrap();
    model::load(Cpu::default(), files, Processing::ALL, None).unwrap()
}

fn dataset(name: &str, tokens: &str, bos: u32) -> Dataset {
    let tokens = load_tokens(&golden_path(tokens));
    Dataset {
        name: name.into(),
        lengths: unpadded_lengths(&tokens, bos),
        tokens,
        ioi: None,
        answers: None,
    }
}

/// Token texts for the tokenizer-less fixture: markup characters included, so escaping is
/// exercised; BOS as GPT-2 shows it.
fn fake_text(id: u32, bos: u32) -> String {
    if id == bos {
        ENDOFTEXT.into()
    } else if id % 7 == 0 {
        format!("<{id}&\"x'>")
    } else {
        format!(" w{id}")
    }
}

fn spec(extra: &str) -> LoadedSpec {
    let text = format!(
        r#"
name = "pics"
[model]
path = "{}"
[[dataset]]
name = "ioi"
kind = "prompts"
prompts = ["a"]
[[dataset]]
name = "web"
kind = "prompts"
prompts = ["b"]
[[metric]]
kind = "source_suppression"
[[metric]]
kind = "loss"
{extra}
"#,
        fixture("ckpt_a").display()
    );
    LoadedSpec::from_str(&text, Path::new("pics.toml")).unwrap()
}

const VIEW: &str = r#"
[[view]]
heads = ["1.2", "0.1"]
sequences = 2
"#;

/// Runs `source_suppression` on two datasets of `ckpt_a` (all heads), writes its CSVs like
/// the runner, then the report. Returns the output directory and what the report wrote.
struct Run {
    dir: tempfile::TempDir,
    tables: Vec<(String, Table)>,
    datasets: Vec<Dataset>,
    loaded: LoadedModel<Cpu>,
    out: report::ReportOutput,
}

fn run_report(extra: &str) -> Run {
    let loaded = load("ckpt_a");
    let cfg = loaded.cfg().clone();
    let bos = cfg.bos_token_id;
    let heads: Vec<(usize, usize)> = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_heads).map(move |h| (l, h)))
        .collect();
    let datasets = vec![
        dataset("ioi", "tokens_a.json", bos),
        dataset("web", "tokens_a_long.json", bos),
    ];
    let ctx = RunContext {
        cfg: &cfg,
        params: &loaded.params,
        heads: &heads,
        bos,
        tokenizer: None,
    };
    let mut metric = metrics::builtin("source_suppression", &toml::Table::new()).unwrap();
    let mut tables: Vec<(String, Table)> = Vec::new();
    for ds in &datasets {
        metric.start_dataset(&ctx, ds).unwrap();
        let mut hooks = Hooks::caching(HookFilter::names(metric.hooks(&ctx)));
        loaded.model.forward(&ds.tokens, &mut hooks).unwrap();
        let cache = hooks.take_cache();
        let view = BatchView {
            dataset: ds,
            start: 0,
            tokens: ds.tokens.view(),
            cache: &cache,
            model: None,
        };
        metric.batch(&ctx, &view).unwrap();
        for mut t in metric.finish_dataset(&ctx, ds).unwrap() {
            // Without a tokenizer the metric writes empty token texts; give them some.
            if let (Some(tok), Some(s), Some(p)) = (t.col("token_text"), t.col("seq"), t.col("pos"))
            {
                for row in &mut t.rows {
                    let (Value::Int(s), Value::Int(p)) = (&row[s], &row[p]) else {
                        panic!("seq/pos are integers")
                    };
                    row[tok] = fake_text(ds.tokens[[*s as usize, *p as usize]], bos).into();
                }
            }
            tables.push((ds.name.clone(), t));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut names: Vec<String> = tables.iter().map(|(_, t)| t.name.clone()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    let mut csvs = Vec::new();
    for name in &names {
        let refs: Vec<(String, &Table)> = tables
            .iter()
            .filter(|(_, t)| &t.name == name)
            .map(|(d, t)| (d.clone(), t))
            .collect();
        csvs.push(output::write_csv(dir.path(), &refs).unwrap());
    }
    let spec = spec(extra);
    let refs: Vec<(String, &Table)> = tables.iter().map(|(d, t)| (d.clone(), t)).collect();
    let out = report::write_all(&ReportInput {
        out_dir: dir.path(),
        spec: &spec,
        loaded: &loaded,
        heads: &heads,
        datasets: &datasets,
        tables: &refs,
        csv_files: &csvs,
        intervention_tables: &[],
        device: "cpu".into(),
        seconds: 1.5,
    });
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    // The runner writes the manifest after the report.
    output::write_json(&dir.path().join("manifest.json"), &serde_json::json!({})).unwrap();
    Run {
        dir,
        tables,
        datasets,
        loaded,
        out,
    }
}

/// `<text>` elements of an SVG as (font-family, x, y, text), in document order. The text is
/// trimmed as SVG's default whitespace handling shows it (plotters puts it on its own line).
fn svg_texts(path: &Path) -> Vec<(String, f64, f64, String)> {
    let svg = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| {
            let num = |a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
            (
                n.attribute("font-family").unwrap_or_default().to_string(),
                num("x"),
                num("y"),
                n.text().unwrap_or_default().trim().to_string(),
            )
        })
        .collect()
}

/// Ranks of `v` among the distinct values of `all` (for mapping positions to grid indices).
fn rank(all: &[f64], v: f64) -> usize {
    let mut d: Vec<f64> = all.to_vec();
    d.sort_by(f64::total_cmp);
    d.dedup();
    d.iter().position(|&x| x == v).unwrap()
}

#[test]
fn heatmap_cells_equal_the_csv() {
    let run = run_report(VIEW);
    let svg_path = run.dir.path().join("source_suppression.svg");
    assert!(run.out.files.contains(&svg_path));
    let texts = svg_texts(&svg_path);
    let cells: Vec<&(String, f64, f64, String)> =
        texts.iter().filter(|t| t.0 == "monospace").collect();

    // The CSV, as any reader would see it.
    let mut csv = csv::Reader::from_path(run.dir.path().join("source_suppression.csv")).unwrap();
    let header = csv.headers().unwrap().clone();
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let (d, l, h, s) = (col("dataset"), col("layer"), col("head"), col("score"));
    let mut expected: BTreeMap<(String, usize, usize), String> = BTreeMap::new();
    let mut datasets: Vec<String> = Vec::new();
    for rec in csv.records() {
        let rec = rec.unwrap();
        let shown = rec[s].to_string();
        if !datasets.contains(&rec[d].to_string()) {
            datasets.push(rec[d].to_string());
        }
        expected.insert(
            (
                rec[d].to_string(),
                rec[l].parse().unwrap(),
                rec[h].parse().unwrap(),
            ),
            shown,
        );
    }
    let cfg = run.loaded.cfg();
    let per_panel = cfg.n_layers * cfg.n_heads;
    assert_eq!(datasets, vec!["ioi", "web"]);
    assert_eq!(
        cells.len(),
        datasets.len() * per_panel,
        "one label per cell"
    );
    // Panels are side by side in dataset order; within one, x gives the head and y the
    // layer (layer 0 on top).
    for (panel, dataset) in cells.chunks(per_panel).zip(&datasets) {
        let xs: Vec<f64> = panel.iter().map(|c| c.1).collect();
        let ys: Vec<f64> = panel.iter().map(|c| c.2).collect();
        let mut seen = BTreeSet::new();
        for c in panel {
            let (layer, head) = (rank(&ys, c.2), rank(&xs, c.1));
            assert!(
                seen.insert((layer, head)),
                "two labels in cell {layer}.{head}"
            );
            let csv = &expected[&(dataset.clone(), layer, head)];
            assert!(
                label_matches(&c.3, csv.parse().unwrap()),
                "{dataset} head {layer}.{head}: label {} for CSV {csv}",
                c.3
            );
        }
    }
    // Panels side by side: every 'web' label right of every 'ioi' label.
    let max_ioi = cells[..per_panel]
        .iter()
        .map(|c| c.1)
        .fold(f64::MIN, f64::max);
    assert!(cells[per_panel..].iter().all(|c| c.1 > max_ioi));
    // Title, panel captions and a colour bar symmetric around 0.
    let labels: Vec<&str> = texts.iter().map(|t| t.3.as_str()).collect();
    assert!(
        labels.contains(&"source_suppression: score per head"),
        "{labels:?}"
    );
    assert!(labels.contains(&"ioi") && labels.contains(&"web"));
    let zmax = expected
        .values()
        .filter_map(|v| v.parse::<f64>().ok())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let ticks = bar_ticks(&texts);
    assert!(ticks.iter().any(|&t| t > 0.0), "{ticks:?}");
    assert!(
        ticks.iter().all(|t| ticks.contains(&-t)),
        "symmetric: {ticks:?}"
    );
    assert!(
        ticks.iter().all(|t| t.abs() <= zmax * 1.01),
        "{ticks:?} vs {zmax}"
    );
}

/// Whether a figure's `label` writes `v`: equal to it within half a unit of the label's last
/// digit (`2.97`: 0.005; `8.1e-4`: 5e-6), with its sign, never `-0`, and `0` only for zero.
fn label_matches(label: &str, v: f64) -> bool {
    if v.is_nan() {
        return label == "NaN";
    }
    if v == 0.0 {
        return label == "0";
    }
    let Ok(x) = label.parse::<f64>() else {
        return false;
    };
    let (mantissa, exp) = match label.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap()),
        None => (label, 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, d)| d.len()) as i32;
    let unit = 10f64.powi(exp - decimals);
    x != 0.0 && x.signum() == v.signum() && (x - v).abs() <= unit / 2.0 * (1.0 + 1e-9)
}

/// The colour bar's tick values: the sans-serif labels right of every cell that parse as
/// numbers (the axes' integer ticks are left of or below the cells).
fn bar_ticks(texts: &[(String, f64, f64, String)]) -> Vec<f64> {
    let right_of_cells = texts
        .iter()
        .filter(|t| t.0 == "monospace")
        .map(|t| t.1)
        .fold(f64::MIN, f64::max);
    texts
        .iter()
        .filter(|t| t.0 == "sans-serif" && t.1 > right_of_cells)
        .filter_map(|t| t.3.parse::<f64>().ok())
        .collect()
}

/// The `width` and `height` of an SVG's root, and the extent of its drawn content: the
/// largest x + width and y + height of any rect, and where any text ends (estimated).
fn svg_extent(svg: &str) -> ((f64, f64), (f64, f64)) {
    let doc = roxmltree::Document::parse(svg).unwrap();
    let root = doc.root_element();
    let num = |n: roxmltree::Node, a: &str| n.attribute(a).and_then(|v| v.parse::<f64>().ok());
    let size = (num(root, "width").unwrap(), num(root, "height").unwrap());
    let (mut w, mut h) = (0.0f64, 0.0f64);
    for n in doc.descendants() {
        if n.has_tag_name("rect") {
            let (x, y) = (num(n, "x").unwrap_or(0.0), num(n, "y").unwrap_or(0.0));
            let (rw, rh) = (
                num(n, "width").unwrap_or(0.0),
                num(n, "height").unwrap_or(0.0),
            );
            // The white background fills the whole canvas: not content.
            if (rw, rh) != size {
                w = w.max(x + rw);
                h = h.max(y + rh);
            }
        } else if n.has_tag_name("text") {
            // About 0.45 em a character (sans-serif on average); the anchor says where x is.
            let size = num(n, "font-size").unwrap_or(12.0);
            let text_w = n.text().unwrap_or_default().trim().chars().count() as f64 * 0.45 * size;
            let right = match n.attribute("text-anchor") {
                Some("middle") => text_w / 2.0,
                Some("end") => 0.0,
                _ => text_w,
            };
            w = w.max(num(n, "x").unwrap_or(0.0) + right);
            h = h.max(num(n, "y").unwrap_or(0.0) + size / 2.0);
        }
    }
    (size, (w, h))
}

/// A 12 x 12 per-head table with values spread over `[-zmax, zmax]` (and one exact zero).
fn synthetic_head_table(name: &str, score: &str, zmax: f64) -> Table {
    let mut t = Table::new(name, &["layer", "head", score]).per_head(score);
    for l in 0..12 {
        for h in 0..12 {
            let i = (l * 12 + h) as f64;
            // A fixed, irregular pattern: both signs, many magnitudes, |v| <= zmax.
            let v = if (l, h) == (5, 5) {
                0.0
            } else {
                zmax * ((i * 0.7371).sin() * (i * 0.1913).cos()).powi(3)
            };
            t.push(vec![
                Value::Int(l),
                Value::Int(h),
                Value::Float(v as f32 as f64),
            ]);
        }
    }
    t
}

/// The two cases a person reads: a GPT-2-small-shaped sweep of small values (every cell
/// read `0.00` or `-0.00` with two decimals) and one of values near +-3; plus a per-token
/// view of small values. Labels must equal the table, have the range's precision, colour
/// bar ticks must be distinct, titles must fit and canvases must fit their content.
/// Set `HOOKGRAPH_PICTURES=DIR` to keep the SVGs (to look at them, e.g. with
/// `scripts/check_pages.py DIR`).
#[test]
fn pictures_of_small_and_large_values_read_right() {
    let keep = std::env::var_os("HOOKGRAPH_PICTURES").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("small", "source_suppression", "score", 0.0023),
        ("large", "projection_loss", "increase_ablation", 2.97),
    ];
    for (case, name, score, zmax) in cases {
        let t1 = synthetic_head_table(name, score, zmax);
        let t2 = synthetic_head_table(name, score, zmax * 0.6);
        let tables = vec![("ioi".to_string(), &t1), ("webtext".to_string(), &t2)];
        let sub = dir.join(case);
        std::fs::create_dir_all(&sub).unwrap();
        let (files, problems) = report::heatmap::write_head_heatmaps(&sub, &tables, 12, 12, &[]);
        assert!(problems.is_empty(), "{problems:?}");
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        let texts = svg_texts(&files[0]);
        let cells: Vec<&(String, f64, f64, String)> =
            texts.iter().filter(|t| t.0 == "monospace").collect();
        assert_eq!(cells.len(), 2 * 144, "{case}");
        let values: Vec<f64> = [&t1, &t2]
            .iter()
            .flat_map(|t| t.rows.iter().map(|r| r[2].as_f64().unwrap()))
            .collect();
        let mut seen_zero = false;
        for (c, &v) in cells.iter().zip(&values) {
            assert!(label_matches(&c.3, v), "{case}: label {} for {v}", c.3);
            // Enough digits for the range: two significant digits or more at the figure's
            // largest value (`2.97`, `2.0e-3`), so any label is within 2.5% of it.
            let x: f64 = c.3.parse().unwrap();
            assert!((x - v).abs() <= 0.025 * zmax, "{case}: {} for {v}", c.3);
            assert!(
                c.3.chars().count() <= 7,
                "{case}: {} is too wide for a cell",
                c.3
            );
            seen_zero |= c.3 == "0";
        }
        assert!(seen_zero, "{case}: the exact zero reads 0");
        let ticks = bar_ticks(&texts);
        let labels: Vec<&str> = texts
            .iter()
            .filter(|t| t.0 == "sans-serif" && t.3.parse::<f64>().is_ok())
            .map(|t| t.3.as_str())
            .collect();
        assert!(ticks.len() >= 3, "{case}: {labels:?}");
        let mut distinct = ticks.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        assert_eq!(distinct.len(), ticks.len(), "{case}: {ticks:?}");
        assert!(
            ticks.iter().all(|t| ticks.contains(&-t)),
            "{case}: {ticks:?}"
        );
        // The colour bar's caption is the whole column name, and inside the canvas.
        let ((w, h), (cw, ch)) = svg_extent(&svg);
        let caption = texts.iter().find(|t| t.3 == score).expect("bar caption");
        let caption_w = draw::text_px(score, draw::CAPTION_PX) as f64;
        assert!(
            caption.1 + caption_w / 2.0 <= w,
            "{case}: caption cut at {w}"
        );
        let title = format!("{name}: {score} per head");
        assert!(texts.iter().any(|t| t.3 == title), "{case}");
        // Canvas sized to its content: no more than a margin of blank space around it.
        assert!(
            cw <= w && ch <= h,
            "{case}: content {cw}x{ch} outside {w}x{h}"
        );
        assert!(
            h - ch <= 40.0 && w - cw <= 60.0,
            "{case}: {w}x{h} for {cw}x{ch}"
        );
    }

    // A per-token view of small values: its own colour bar with distinct ticks.
    let mut t = Table::new(
        "source_suppression_per_position",
        &["layer", "head", "seq", "pos", "token", "value"],
    );
    for (i, (l, h)) in [(10usize, 7usize), (11, 10), (9, 9)]
        .into_iter()
        .enumerate()
    {
        for s in 0..4 {
            for p in 0..9 {
                let x = (i * 36 + s * 9 + p) as f64;
                let v = 0.0031 * (x * 0.91).sin().powi(3);
                let tok = if p == 0 {
                    ENDOFTEXT.to_string()
                } else {
                    format!(" w{p}")
                };
                t.push(vec![
                    Value::Int(l as i64),
                    Value::Int(h as i64),
                    Value::Int(s as i64),
                    Value::Int(p as i64),
                    tok.into(),
                    Value::Float(v),
                ]);
            }
        }
    }
    let view = views::ResolvedView {
        metric: "source_suppression".into(),
        dataset: "ioi".into(),
        heads: vec![(10, 7), (11, 10), (9, 9)],
        sequences: 4,
    };
    let svg = views::view_svg(&view, &views::view_data(&view, &t, None).unwrap()).unwrap();
    let path = dir.join("view_small.svg");
    std::fs::write(&path, &svg).unwrap();
    let texts = svg_texts(&path);
    let ticks = bar_ticks(&texts);
    assert!(ticks.len() >= 3, "{texts:?}");
    let mut distinct = ticks.clone();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    assert_eq!(distinct.len(), ticks.len(), "{ticks:?}");
    assert!(ticks.iter().all(|t| t.abs() <= 0.0031), "{ticks:?}");
    let ((w, h), (cw, ch)) = svg_extent(&svg);
    assert!(
        cw <= w && ch <= h && h - ch <= 40.0,
        "{w}x{h} for {cw}x{ch}"
    );
}

#[test]
fn view_svg_labels_every_token() {
    let run = run_report(VIEW);
    let path = run.dir.path().join("view_source_suppression_ioi.svg");
    assert!(run.out.files.contains(&path), "{:?}", run.out.files);
    let texts = svg_texts(&path);
    let cells: Vec<&str> = texts
        .iter()
        .filter(|t| t.0 == "monospace")
        .map(|t| t.3.as_str())
        .collect();
    let ds = &run.datasets[0];
    let bos = run.loaded.cfg().bos_token_id;
    let mut expected = Vec::new();
    for s in 0..2 {
        for p in 0..ds.lengths[s] {
            let label = views::token_label(&fake_text(ds.tokens[[s, p]], bos))
                .trim()
                .to_string();
            if !label.is_empty() {
                expected.push(label);
            }
        }
    }
    // One panel per head, two heads: every label appears twice, markup escaped and back.
    for label in &expected {
        assert_eq!(
            cells.iter().filter(|c| *c == label).count(),
            2 * expected.iter().filter(|e| *e == label).count(),
            "{label:?}"
        );
    }
    assert!(expected.iter().any(|l| l.contains('<') && l.contains('&')));
    assert!(!cells.contains(&ENDOFTEXT), "BOS is shown empty");
    let all: Vec<&str> = texts.iter().map(|t| t.3.as_str()).collect();
    assert!(all.contains(&"head 1.2") && all.contains(&"head 0.1"));
}

#[test]
fn default_view_shows_the_three_most_negative_heads() {
    let run = run_report("");
    let refs: Vec<(String, &Table)> = run.tables.iter().map(|(d, t)| (d.clone(), t)).collect();
    let view = views::default_view(&spec(""), &refs).expect("a default view");
    let t = &run
        .tables
        .iter()
        .find(|(d, t)| d == "ioi" && t.name == "source_suppression")
        .unwrap()
        .1;
    let mut scores: Vec<(f64, (usize, usize))> = t
        .rows
        .iter()
        .filter_map(|r| {
            let v = r[2].as_f64()?;
            let (Value::Int(l), Value::Int(h)) = (&r[0], &r[1]) else {
                return None;
            };
            v.is_finite().then_some((v, (*l as usize, *h as usize)))
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0));
    let want: Vec<(usize, usize)> = scores.iter().take(3).map(|s| s.1).collect();
    assert_eq!(view.heads, want);
    assert_eq!((view.dataset.as_str(), view.sequences), ("ioi", 10));
    assert!(run
        .dir
        .path()
        .join("view_source_suppression_ioi.svg")
        .is_file());
    assert!(run.dir.path().join("attention_ioi.html").is_file());
}

#[test]
fn bad_views_are_errors_before_running() {
    let heads = vec![(0, 0), (1, 2)];
    let check =
        |extra: &str| report::check_views(&spec(extra), &heads, 2, 4).map_err(|e| e.to_string());
    let ok = check("[[view]]\nheads = [\"1.2\"]\ndataset = \"web\"").unwrap();
    assert_eq!(ok[0].heads, vec![(1, 2)]);
    assert_eq!(ok[0].sequences, 10);
    for (extra, needle) in [
        (
            "[[view]]\nheads = [\"0.1\"]",
            "head 0.1 is not among the run's heads",
        ),
        ("[[view]]\nheads = [\"7.1\"]", "layer 7 is out of range"),
        (
            "[[view]]\nheads = [\"1.2\"]\ndataset = \"nope\"",
            "dataset 'nope'",
        ),
        (
            "[[view]]\nheads = [\"1.2\"]\nmetric = \"nope\"",
            "metric 'nope'",
        ),
        (
            "[[view]]\nheads = [\"1.2\"]\nmetric = \"loss\"",
            "no per-position values",
        ),
        ("[[view]]\nheads = []", "`heads` is empty"),
        ("[[view]]\nheads = [\"1.2\"]\nsequences = 0", "at least 1"),
        (
            "[[view]]\nheads = [\"1.2\"]\n[[view]]\nheads = [\"0.0\"]",
            "merge their heads",
        ),
    ] {
        let err = check(extra).unwrap_err();
        assert!(err.contains(needle), "{extra}: {err}");
        assert!(err.starts_with("pics.toml: [[view]] #"), "{err}");
    }
}

#[test]
fn attention_page_holds_the_forward_pass_patterns() {
    let run = run_report(VIEW);
    let html = std::fs::read_to_string(run.dir.path().join("attention_ioi.html")).unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no fetches"
    );
    let start = html.find("type=\"application/json\">").unwrap() + 24;
    let end = start + html[start..].find("</script>").unwrap();
    let data: serde_json::Value = serde_json::from_str(&html[start..end]).unwrap();
    assert_eq!(data["heads"], serde_json::json!(["1.2", "0.1"]));
    let ds = &run.datasets[0];
    // Every sequence the view shows, each with its own pass.
    let seqs = data["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 2, "the view's `sequences = 2`");
    for (s, sq) in seqs.iter().enumerate() {
        assert_eq!(sq["index"], s);
        let n = ds.lengths[s];
        assert_eq!(sq["tokens"].as_array().unwrap().len(), n);
        let tokens: Vec<u32> = ds.tokens.row(s).iter().take(n).copied().collect();
        let want =
            attention::attention_patterns(&run.loaded.model, &tokens, &[(1, 2), (0, 1)]).unwrap();
        for (i, w) in want.iter().enumerate() {
            for q in 0..n {
                let row = sq["patterns"][i][q].as_array().unwrap();
                assert_eq!(row.len(), n);
                let sum: f64 = row.iter().map(|v| v.as_f64().unwrap()).sum();
                assert!((sum - 1.0).abs() < 1e-3, "row {q} sums to {sum}");
                for k in 0..n {
                    assert!((row[k].as_f64().unwrap() - w[[q, k]] as f64).abs() < 1e-4);
                }
            }
        }
    }
    // Markup in token text cannot end the script early.
    let page = attention::attention_html(
        "t",
        &[(0, 0)],
        &[attention::PageSequence {
            index: 0,
            tokens: vec!["</script><b>".to_string()],
            patterns: vec![Array2::from_elem((1, 1), 1.0)],
        }],
    )
    .unwrap();
    assert_eq!(page.matches("</script>").count(), 2);
}

#[test]
fn index_links_every_file_that_exists() {
    let run = run_report(VIEW);
    let index = std::fs::read_to_string(run.dir.path().join("index.html")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(run.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "index.html")
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    for name in &names {
        let href = format!("href=\"{}\"", report::index::url_part(name));
        assert!(index.contains(&href), "index.html does not link {name}");
        if name.ends_with(".svg") {
            assert!(
                index.contains(&format!("src=\"{name}\"")),
                "{name} not embedded"
            );
        }
    }
    let written: Vec<PathBuf> = run.out.files.clone();
    assert!(written.iter().all(|p| p.is_file()));
    assert!(index.contains("ioi (3 sequences x 12 tokens)"), "{index}");
    assert!(index.contains("1.5 s"));
}

/// `logits_host` on `ids`, softmaxed directly, sorted: (id, logit, prob) at position `pos`.
fn direct(loaded: &LoadedModel<Cpu>, ids: &[u32], pos: usize) -> Vec<(u32, f32, f64)> {
    let t = Array2::from_shape_vec((1, ids.len()), ids.to_vec()).unwrap();
    let logits = loaded.model.logits_host(&t, &mut Hooks::default()).unwrap();
    let row: Vec<f32> = logits.slice(ndarray::s![0, pos, ..]).to_vec();
    let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    let mut out: Vec<(u32, f32, f64)> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x, (x as f64 - m).exp() / z))
        .collect();
    out.sort_by(|a, b| b.2.total_cmp(&a.2));
    out
}

#[test]
fn test_prompt_matches_a_direct_softmax() {
    let loaded = load("ckpt_a");
    let toks = load_tokens(&golden_path("tokens_a.json"));
    let row: Vec<u32> = toks.row(0).to_vec();
    let prompt = &row[..7];
    let answer = vec![row[7], row[8], row[9]];
    let text = |id: u32| format!("t{id}");
    let rep = prompt::test_prompt_ids(
        &loaded.model,
        prompt,
        std::slice::from_ref(&answer),
        5,
        &text,
    )
    .unwrap();
    assert_eq!(rep.positions.len(), 3);
    let full: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    for (j, pos) in rep.positions.iter().enumerate() {
        let d = direct(&loaded, &full, prompt.len() - 1 + j);
        for (i, top) in pos.top.iter().enumerate() {
            assert_eq!(top.id, d[i].0);
            assert_eq!(top.logit, d[i].1);
            assert!((top.prob as f64 - d[i].2).abs() < 1e-6);
        }
        let a = &pos.answers[0];
        let r = d.iter().position(|x| x.0 == answer[j]).unwrap();
        assert_eq!((a.id, a.rank), (answer[j], r));
        assert!((a.prob as f64 - d[r].2).abs() < 1e-6);
    }
    // TL's layout, line by line.
    let printed = rep.to_string();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(
        lines[0],
        "Tokenized prompt: ['t511', 't359', 't441', 't137', 't451', 't241', 't451']"
    );
    assert_eq!(lines[1], "Tokenized answer: ['t290', 't206', 't358']");
    assert_eq!(lines[2], "Performance on answer token:");
    let a = &rep.positions[0].answers[0];
    assert_eq!(
        lines[3],
        format!(
            "Rank: {:<8} Logit: {:5.2} Prob: {:>6} Token: |t290|",
            a.rank,
            a.logit,
            format!("{:.2}%", a.prob * 100.0)
        )
    );
    assert!(lines[4].starts_with("Top 0th token. Logit: "));
    assert_eq!(lines.len(), 2 + 3 * (1 + 1 + 5) + 1);
    assert_eq!(
        *lines.last().unwrap(),
        format!(
            "Ranks of the answer tokens: [('t290', {}), ('t206', {}), ('t358', {})]",
            rep.positions[0].answers[0].rank,
            rep.positions[1].answers[0].rank,
            rep.positions[2].answers[0].rank
        )
    );

    // Several answers: first tokens only, at the next position, one forward pass.
    let rep = prompt::test_prompt_ids(&loaded.model, prompt, &[vec![row[7]], vec![5, 6]], 3, &text)
        .unwrap();
    assert_eq!(rep.positions.len(), 1);
    let d = direct(&loaded, prompt, prompt.len() - 1);
    for (a, id) in rep.positions[0].answers.iter().zip([row[7], 5]) {
        assert_eq!(a.rank, d.iter().position(|x| x.0 == id).unwrap());
    }
    let printed = rep.to_string();
    assert!(printed
        .contains("Tokenized answers: [['t290'], ['t5', 't6']]\nPerformance on answer tokens:\n"));
    assert!(printed.ends_with(&format!(
        "Ranks of the answer tokens: [[('t290', {}), ('t5', {})]]\n",
        rep.positions[0].answers[0].rank, rep.positions[0].answers[1].rank
    )));
}

/// GPT-2's tokenizer files, as shipped with the tiny checkpoint.
fn gpt2_tokenizer() -> Option<GptTokenizer> {
    Some(GptTokenizer::from_dir(&root().join("experiments/checkpoints/tiny-gpt2")).unwrap())
}

#[test]
fn prompt_tokens_match_the_notebook() {
    let Some(tok) = gpt2_tokenizer() else {
        eprintln!("skipped: no GPT-2 tokenizer files (experiments/checkpoints/tiny-gpt2)");
        return;
    };
    let p = "Then, Sarah and Arthur had a lot of fun at the hospital. Arthur gave a bone to";
    let (ids, answers) =
        prompt::prompt_ids(&tok, 50256, p, &["Sarah".into()], Default::default()).unwrap();
    let shown = |ids: &[u32]| {
        format!(
            "[{}]",
            ids.iter()
                .map(|&i| prompt::py_repr(&tok.decode_one(i)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // The notebook's printout of `utils.test_prompt`.
    assert_eq!(
        shown(&ids),
        "['<|endoftext|>', 'Then', ',', ' Sarah', ' and', ' Arthur', ' had', ' a', ' lot', ' of', ' fun', ' at', ' the', ' hospital', '.', ' Arthur', ' gave', ' a', ' bone', ' to']"
    );
    assert_eq!(shown(&answers[0]), "[' Sarah']");
}

/// The smoke checkpoint (a tiny GPT-2 with GPT-2's vocabulary), when this checkout has it:
/// the text path end to end against a direct softmax.
#[test]
fn test_prompt_on_the_smoke_checkpoint() {
    let dir = root().join("experiments/checkpoints/tiny-gpt2");
    if !dir.join("config.json").is_file() {
        eprintln!("skipped: {} is not in this checkout", dir.display());
        return;
    }
    let files = CheckpointFiles::in_dir(&dir).unwrap();
    let tok_dir = [
        dir.clone(),
        root().join("experiments/checkpoints/tiny-gpt2"),
        PathBuf::from("/work/shared/data/gpt2"),
    ]
    .into_iter()
    .find(|d| GptTokenizer::present_in(d))
    .expect("tokenizer files");
    let loaded = model::load(Cpu::default(), files, Processing::ALL, Some(&tok_dir)).unwrap();
    let tok = loaded.tokenizer().unwrap();
    let p = "Then, Sarah and Arthur had a lot of fun at the hospital. Arthur gave a bone to";
    let rep = prompt::test_prompt(
        &loaded.model,
        tok,
        p,
        &[" Sarah".into()],
        Default::default(),
    )
    .unwrap();
    let (ids, answers) = prompt::prompt_ids(
        tok,
        loaded.cfg().bos_token_id,
        p,
        &[" Sarah".into()],
        Default::default(),
    )
    .unwrap();
    let d = direct(&loaded, &ids, ids.len() - 1);
    let pos = &rep.positions[0];
    assert_eq!(pos.top.len(), 10);
    for (t, want) in pos.top.iter().zip(&d) {
        assert_eq!(t.id, want.0);
        assert!((t.prob as f64 - want.2).abs() < 1e-6);
    }
    let r = d.iter().position(|x| x.0 == answers[0][0]).unwrap();
    assert_eq!(pos.answers[0].rank, r);
    assert!(rep
        .to_string()
        .starts_with("Tokenized prompt: ['<|endoftext|>', 'Then', ','"));
}

/// Not a check: writes sample results for looking at (and for `scripts/check_pages.sh`):
/// `$HOOKGRAPH_DEMO_DIR` (default `target/report-demo`) gets `tiny/`, the report of the
/// fixture model, and `gpt2-shaped/`, a 12 x 12 model's figures from made-up values with
/// GPT-2 token texts. `cargo test --test report -- --ignored demo`.
#[test]
#[ignore]
fn demo_results() {
    let base = std::env::var_os("HOOKGRAPH_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/report-demo"));
    let tiny = base.join("tiny");
    let _ = std::fs::remove_dir_all(&tiny);
    let run = run_report(VIEW);
    std::fs::create_dir_all(&tiny).unwrap();
    for e in std::fs::read_dir(run.dir.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tiny.join(e.file_name())).unwrap();
    }

    // GPT-2 small's shape, values from a fixed hash, tokens from the notebook's prompts.
    let shaped = base.join("gpt2-shaped");
    let _ = std::fs::remove_dir_all(&shaped);
    std::fs::create_dir_all(&shaped).unwrap();
    let noise = |a: usize, b: usize, c: usize| {
        let x = ((a * 7919 + b * 104729 + c * 1299709) % 10007) as f64 / 10007.0;
        x * 2.0 - 1.0
    };
    let mut tables: Vec<(String, Table)> = Vec::new();
    for (di, d) in ["IOI", "Webtext"].iter().enumerate() {
        let mut t = Table::new("source_suppression", &["layer", "head", "score"]).per_head("score");
        for l in 0..12 {
            for h in 0..12 {
                let mut v = 0.15 * noise(l, h, di);
                if (l, h) == (10, 7) {
                    v = if di == 0 { -4.87 } else { -1.23 };
                }
                if (l, h) == (11, 10) {
                    v = -2.05;
                }
                if (l, h) == (3, 3) && di == 1 {
                    v = f64::NAN;
                }
                t.push(vec![l.into(), h.into(), v.into()]);
            }
        }
        tables.push((d.to_string(), t));
    }
    let tok = gpt2_tokenizer();
    let prompts = [
        "Then, Sarah and Arthur had a lot of fun at the hospital. Arthur gave a bone to",
        "When Mary and John went to the store, John gave a drink to",
        "After Lisa and Tom met at the park, Tom handed a \"ring\" <to> & over\nto",
    ];
    let mut pp = Table::new(
        "source_suppression_per_position",
        &["layer", "head", "seq", "pos", "token", "value"],
    );
    let mut texts: Vec<Vec<String>> = Vec::new();
    for p in prompts {
        let mut row = vec![ENDOFTEXT.to_string()];
        match &tok {
            Some(t) => row.extend(t.encode(p).unwrap().iter().map(|&i| t.decode_one(i))),
            None => row.extend(p.split(' ').map(|w| format!(" {w}"))),
        }
        texts.push(row);
    }
    let width = texts.iter().map(Vec::len).max().unwrap();
    let heads = [(10usize, 7usize), (11, 10), (9, 9)];
    for &(l, h) in &heads {
        for (s, row) in texts.iter().enumerate() {
            for pos in 0..width {
                let token = row.get(pos).cloned().unwrap_or_else(|| ENDOFTEXT.into());
                let v = if pos == 0 || pos >= row.len() {
                    0.0
                } else {
                    3.0 * noise(l * 12 + h, s, pos)
                };
                pp.push(vec![
                    l.into(),
                    h.into(),
                    s.into(),
                    pos.into(),
                    token.into(),
                    v.into(),
                ]);
            }
        }
    }
    tables.push(("IOI".into(), pp));
    // Webtext-like: 10 sequences of 48 tokens of running text.
    let text =
        "Key question: why isn't it sparse if you don't give more weight to the things which \
        are attended to more? Answer: because most tokens in sequences are generic, like 'the' \
        and ',', so this doesn't really work for them. It's very large and negative on IOI, \
        because basically all attention which isn't BOS or self-attention is to the IO token, \
        which negatively suppresses it. But it's also noticeably negative on Webtext (and still \
        sparse). The thing that confuses me most is how many false negatives there are.\n\n\
        Why do so many heads have nontrivially large dot products? Aren't cosine similarities \
        about 0 for random vectors? Maybe crop to all situations where >10% attention is paid.";
    let ids: Vec<String> = match &tok {
        Some(t) => t
            .encode(text)
            .unwrap()
            .iter()
            .map(|&i| t.decode_one(i))
            .collect(),
        None => text.split(' ').map(|w| format!(" {w}")).collect(),
    };
    let mut web = Table::new(
        "source_suppression_per_position",
        &["layer", "head", "seq", "pos", "token", "value"],
    );
    for &(l, h) in &heads {
        for s in 0..10 {
            for pos in 0..48 {
                let token = if pos == 0 {
                    ENDOFTEXT.to_string()
                } else {
                    ids[(s * 13 + pos) % ids.len()].clone()
                };
                let v = if pos == 0 {
                    0.0
                } else {
                    0.8 * noise(l * 12 + h, s, pos).powi(3)
                };
                web.push(vec![
                    l.into(),
                    h.into(),
                    s.into(),
                    pos.into(),
                    token.into(),
                    v.into(),
                ]);
            }
        }
    }
    tables.push(("Webtext".into(), web));
    let refs: Vec<(String, &Table)> = tables.iter().map(|(d, t)| (d.clone(), t)).collect();
    let mut csvs = Vec::new();
    for name in ["source_suppression", "source_suppression_per_position"] {
        let parts: Vec<(String, &Table)> = refs
            .iter()
            .filter(|(_, t)| t.name == name)
            .cloned()
            .collect();
        csvs.push(output::write_csv(&shaped, &parts).unwrap());
    }
    let (heatmaps, problems) = report::heatmap::write_head_heatmaps(&shaped, &refs, 12, 12, &[]);
    assert!(problems.is_empty(), "{problems:?}");
    let view = views::ResolvedView {
        metric: "source_suppression".into(),
        dataset: "IOI".into(),
        heads: heads.to_vec(),
        sequences: 10,
    };
    let (mut notes, mut problems) = (Vec::new(), Vec::new());
    let web_view = views::ResolvedView {
        dataset: "Webtext".into(),
        ..view.clone()
    };
    let view_files = views::write_views(
        &shaped,
        &[view, web_view],
        &refs,
        &[],
        &mut notes,
        &mut problems,
    );
    assert!(
        problems.is_empty() && notes.is_empty(),
        "{problems:?} {notes:?}"
    );
    let n = texts[0].len();
    let patterns: Vec<Array2<f32>> = heads
        .iter()
        .map(|&(l, h)| {
            let mut p = Array2::<f32>::zeros((n, n));
            for q in 0..n {
                let w: Vec<f32> = (0..=q)
                    .map(|k| (3.0 * noise(l + h, q, k)).exp() as f32)
                    .collect();
                let z: f32 = w.iter().sum();
                for k in 0..=q {
                    p[[q, k]] = w[k] / z;
                }
            }
            p
        })
        .collect();
    let page = attention::attention_html(
        "Attention patterns: dataset IOI",
        &heads,
        &[attention::PageSequence {
            index: 0,
            tokens: texts[0].clone(),
            patterns,
        }],
    )
    .unwrap();
    let page_path = shaped.join("attention_IOI.html");
    output::write_atomic(&page_path, page.as_bytes()).unwrap();
    output::write_json(&shaped.join("manifest.json"), &serde_json::json!({})).unwrap();
    report::index::write_index(
        &shaped,
        &report::index::RunSummary {
            name: "gpt2-shaped".into(),
            model: "(made-up values)".into(),
            device: "cpu".into(),
            heads: 144,
            datasets: vec![("IOI".into(), 3, width), ("Webtext".into(), 0, 0)],
            seconds: 0.0,
        },
        &report::index::IndexFiles {
            heatmaps,
            interventions: Vec::new(),
            views: view_files,
            pages: vec![page_path],
            csvs,
            other: vec!["manifest.json".into()],
        },
        &[],
    )
    .unwrap();
    eprintln!("wrote {} and {}", tiny.display(), shaped.display());
}

/// The `<title>`s of an SVG's hover boxes, with each box's (x, y, width, height).
fn svg_hovers(svg: &str) -> Vec<(String, [f64; 4])> {
    let doc = roxmltree::Document::parse(svg).expect("the SVG is well-formed XML");
    doc.descendants()
        .filter(|n| n.has_tag_name("title"))
        .map(|t| {
            let r = t.parent_element().unwrap();
            assert!(r.has_tag_name("rect"), "a <title> inside a hover box");
            let num = |a: &str| r.attribute(a).unwrap().parse::<f64>().unwrap();
            (
                t.text().unwrap_or_default().to_string(),
                [num("x"), num("y"), num("width"), num("height")],
            )
        })
        .collect()
}

#[test]
fn every_heatmap_and_view_cell_has_a_title_with_its_value_and_key() {
    let run = run_report(VIEW);
    // Heatmap: one title per (dataset, layer, head), holding the CSV's exact value.
    let svg = std::fs::read_to_string(run.dir.path().join("source_suppression.svg")).unwrap();
    let hovers = svg_hovers(&svg);
    let cfg = run.loaded.cfg();
    assert_eq!(hovers.len(), 2 * cfg.n_layers * cfg.n_heads);
    let mut csv = csv::Reader::from_path(run.dir.path().join("source_suppression.csv")).unwrap();
    for rec in csv.records() {
        let rec = rec.unwrap();
        let want = format!(
            "{}: layer {l}, head {h} ({l}.{h}): score = {}",
            &rec[0],
            &rec[3],
            l = &rec[1],
            h = &rec[2]
        );
        assert!(
            hovers.iter().any(|(t, _)| *t == want),
            "no title {want:?} in {:?}",
            &hovers[..3]
        );
    }
    // Boxes are cells: positive size, none overlapping another.
    for (i, (_, a)) in hovers.iter().enumerate() {
        assert!(a[2] > 0.0 && a[3] > 0.0);
        for (_, b) in &hovers[i + 1..] {
            let apart = a[0] + a[2] <= b[0]
                || b[0] + b[2] <= a[0]
                || a[1] + a[3] <= b[1]
                || b[1] + b[3] <= a[1];
            assert!(apart, "{a:?} overlaps {b:?}");
        }
    }
    // View: one title per (head, sequence, position) with the token and the value.
    let svg =
        std::fs::read_to_string(run.dir.path().join("view_source_suppression_ioi.svg")).unwrap();
    let hovers = svg_hovers(&svg);
    let ds = &run.datasets[0];
    assert_eq!(hovers.len(), 2 * 2 * ds.seq_len(), "2 heads x 2 sequences");
    let bos = cfg.bos_token_id;
    let tok = fake_text(ds.tokens[[1, 2]], bos);
    let want = format!("head 0.1, sequence 1, position 2, token {tok:?}: value = ");
    assert!(
        hovers.iter().any(|(t, _)| t.starts_with(&want)),
        "{want:?} not in {:?}",
        hovers.iter().map(|h| &h.0).collect::<Vec<_>>()
    );
    if ds.lengths[0] < ds.seq_len() {
        let last = ds.seq_len() - 1;
        assert!(hovers.iter().any(|(t, _)| t
            .starts_with(&format!("head 1.2, sequence 0, position {last},"))
            && t.ends_with("padding")));
    }
}

#[test]
fn a_wide_view_puts_its_colour_bar_on_the_left() {
    let view = |n_pos: usize| {
        let mut t = Table::new(
            "source_suppression_per_position",
            &[
                "layer",
                "head",
                "seq",
                "pos",
                "token",
                "token_text",
                "value",
            ],
        );
        for p in 0..n_pos {
            t.push(vec![
                Value::Int(0),
                Value::Int(0),
                Value::Int(0),
                Value::Int(p as i64),
                Value::Int(p as i64),
                format!(" w{p}").into(),
                Value::Float((p as f64 * 0.3).sin()),
            ]);
        }
        let v = views::ResolvedView {
            metric: "source_suppression".into(),
            dataset: "d".into(),
            heads: vec![(0, 0)],
            sequences: 1,
        };
        views::view_svg(&v, &views::view_data(&v, &t, None).unwrap()).unwrap()
    };
    // The colour bar's caption ("value") is left of the first cell or right of the last.
    let bar_side = |svg: &str| {
        let doc = roxmltree::Document::parse(svg).unwrap();
        let hovers = svg_hovers(svg);
        let first = hovers.iter().map(|h| h.1[0]).fold(f64::MAX, f64::min);
        let last = hovers
            .iter()
            .map(|h| h.1[0] + h.1[2])
            .fold(f64::MIN, f64::max);
        let caption = doc
            .descendants()
            .find(|n| n.has_tag_name("text") && n.text().is_some_and(|t| t.trim() == "value"))
            .expect("the colour bar's caption");
        let x: f64 = caption.attribute("x").unwrap().parse().unwrap();
        let width: f64 = doc
            .root_element()
            .attribute("width")
            .unwrap()
            .parse()
            .unwrap();
        (x < first, x > last, width)
    };
    let (left, right, width) = bar_side(&view(20));
    assert!(
        !left && right && width <= 1400.0,
        "narrow: bar on the right"
    );
    let (left, right, width) = bar_side(&view(60));
    assert!(left && !right && width > 1400.0, "wide: bar on the left");
}

// ---------------------------------------------------------------- intervention heatmaps

/// An intervention table of one dataset as `[[intervention]]` writes it: keys `layer,head`
/// (or `layer,pos`) and the patching columns, `recovered` spread over [-0.4, 1.1].
fn synthetic_patch_table(name: &str, key: &str, width: usize) -> Table {
    let mut t = Table::new(
        name,
        &[
            "layer",
            key,
            "loss_orig",
            "loss",
            "increase",
            "kl",
            "logit_diff_orig",
            "logit_diff",
            "logit_diff_source",
            "recovered",
        ],
    );
    for l in 0..12usize {
        for c in 0..width {
            let i = (l * width + c) as f64;
            let rec = if (l, c) == (9, 9) {
                1.1
            } else {
                0.4 * ((i * 0.7371).sin() * (i * 0.1913).cos()).powi(3)
            };
            let ld = -2.0 + rec * 4.0;
            t.push(vec![
                Value::Int(l as i64),
                Value::Int(c as i64),
                Value::Float(3.0),
                Value::Float(3.1),
                Value::Float(0.1),
                Value::Float(0.01),
                Value::Float(-2.0),
                Value::Float(ld as f32 as f64),
                Value::Float(2.0),
                Value::Float(rec as f32 as f64),
            ]);
        }
    }
    t
}

/// The heads picture of a patching table: `recovered` per head, one panel per dataset,
/// every cell's label equal to the table (the CSV's number), a scale symmetric around 0
/// reaching at least 1 (full recovery), and the title naming what is shown. Set
/// `HOOKGRAPH_PICTURES=DIR` to keep the SVGs.
#[test]
fn intervention_heatmap_shows_recovered_per_head() {
    use report::intervention::{self, Layout, Shown};
    let keep = std::env::var_os("HOOKGRAPH_PICTURES").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let t = synthetic_patch_table("patch_z", "head", 12);
    assert!(intervention::is_intervention_table(&t));
    assert_eq!(Layout::of(&t).unwrap(), Layout::Heads);
    assert_eq!(
        intervention::shown_value(&t),
        Some(Shown::Column("recovered".into()))
    );
    let tables = vec![("flipped".to_string(), &t)];
    let (files, problems) = intervention::write_intervention_heatmaps(
        &dir,
        &tables,
        &[],
        12,
        12,
        &|id| format!("#{id}"),
        &["patch_z".to_string()],
    );
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(files, vec![dir.join("patch_z.svg")]);
    let texts = svg_texts(&files[0]);
    let cells: Vec<_> = texts.iter().filter(|t| t.0 == "monospace").collect();
    assert_eq!(cells.len(), 144);
    let rec = t.col("recovered").unwrap();
    for (c, row) in cells.iter().zip(&t.rows) {
        let v = row[rec].as_f64().unwrap();
        assert!(label_matches(&c.3, v), "label {} for {v}", c.3);
    }
    assert!(
        texts.iter().any(|t| t.3 == "patch_z: recovered per head"),
        "{texts:?}"
    );
    let ticks = bar_ticks(&texts);
    let top = ticks.iter().fold(0.0f64, |m, t| m.max(*t));
    assert!(ticks.iter().all(|t| ticks.contains(&-t)), "{ticks:?}");
    assert!(top >= 1.0, "{ticks:?}");

    // The same table as its CSV holds it (a dataset column, two datasets): two panels.
    let mut both = Table::new("patch_z", &[]);
    both.columns = std::iter::once("dataset".to_string())
        .chain(t.columns.iter().cloned())
        .collect();
    for d in ["a", "b"] {
        for r in &t.rows {
            both.push(
                std::iter::once(Value::Str(d.into()))
                    .chain(r.iter().cloned())
                    .collect(),
            );
        }
    }
    let parts = intervention::split_by_dataset(&both, "x");
    assert_eq!(parts.len(), 2);
    assert_eq!((parts[0].0.as_str(), parts[1].0.as_str()), ("a", "b"));
    assert_eq!(parts[1].1.rows, t.rows);
    let svg =
        intervention::draw_table("patch_z", &parts, &[], 12, 12, &|id| id.to_string()).unwrap();
    assert_eq!(svg.matches("font-family=\"monospace\"").count(), 288);
}

/// The positions picture (`resid_pre` with `per_position`): layers x positions, the
/// dataset's first sequence's tokens under the columns (a leading space as `·`, BOS as
/// `<bos>`), every cell labelled.
#[test]
fn intervention_heatmap_shows_tokens_on_the_positions_axis() {
    use report::intervention;
    let keep = std::env::var_os("HOOKGRAPH_PICTURES").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let mut t = synthetic_patch_table("patch_resid_pre", "pos", 6);
    t.name = "patch_resid_pre".into();
    let tokens = ndarray::array![[511u32, 5, 6, 7, 8, 9], [511, 5, 6, 7, 511, 511]];
    let ds = Dataset {
        name: "clean".into(),
        lengths: unpadded_lengths(&tokens, 511),
        tokens,
        ioi: None,
        answers: None,
    };
    let words = ["", " When", " Mary", " and", " John", " went"];
    let text = |id: u32| {
        if id == 511 {
            ENDOFTEXT.to_string()
        } else {
            words[id as usize - 4].to_string()
        }
    };
    let tables = vec![("clean".to_string(), &t)];
    let (files, problems) = intervention::write_intervention_heatmaps(
        &dir,
        &tables,
        &[ds],
        12,
        12,
        &text,
        &["patch_resid_pre".to_string()],
    );
    assert!(problems.is_empty(), "{problems:?}");
    let texts = svg_texts(&files[0]);
    for want in ["0 <bos>", "1 ·When", "2 ·Mary", "5 ·went"] {
        assert!(texts.iter().any(|t| t.3 == want), "{want}: {texts:?}");
    }
    assert_eq!(texts.iter().filter(|t| t.0 == "monospace").count(), 12 * 6);
    assert!(texts
        .iter()
        .any(|t| t.3 == "patch_resid_pre: recovered per layer and position"));
}

/// An ablation table without patching columns shows the loss increase; with
/// `measure = ["logit_diff"]` alone, the change of the logit difference.
#[test]
fn intervention_heatmap_picks_the_value_to_show() {
    use report::intervention::{shown_value, Shown};
    let t = Table::new(
        "ablate_zero_z",
        &["layer", "head", "loss_orig", "loss", "increase", "kl"],
    );
    assert_eq!(shown_value(&t), Some(Shown::Column("increase".into())));
    let t = Table::new("x", &["layer", "head", "logit_diff_orig", "logit_diff"]);
    assert_eq!(shown_value(&t), Some(Shown::LogitDiffChange));
    let mut t = Table::new("x", &["layer", "logit_diff_orig", "logit_diff"]);
    t.push(vec![Value::Int(0), Value::Float(1.0), Value::Float(0.25)]);
    t.push(vec![Value::Int(1), Value::Float(1.0), Value::Float(1.5)]);
    let svg =
        report::intervention::draw_table("x", &[("d".into(), t)], &[], 2, 4, &|id| id.to_string())
            .unwrap();
    assert!(svg.contains("-0.750") && svg.contains("0.500"), "{svg}");
    assert!(svg.contains("logit_diff change per layer"));
}
