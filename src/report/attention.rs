//! Attention pattern pages (CircuitsVis's `attention_patterns`): for chosen heads and the
//! view's first sequences, a self-contained HTML page with a sequence selector, a head
//! selector, the selected head's pattern as a heatmap, and the tokens; hovering a token (or
//! a heatmap row) highlights its attention row and colours every token by how much the
//! hovered one attends to it.
//!
//! Owns: small forward passes of its own (one per sequence shown, caching only
//! `blocks.L.attn.hook_pattern` of the layers shown) and the page, `attention_<dataset>.html`.
//! The passes are separate from the run's hook graph on purpose: the metrics' single pass
//! per batch stays exactly what the metrics declared, and a few sequences cost next to
//! nothing.
//! Must not: touch the run's cache or metrics. The page fetches nothing: CSS, script and
//! data are inline, so it opens from disk, offline, anywhere.

use std::path::{Path, PathBuf};

use ndarray::{s, Array2, Ix4};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::{block_hook, HookFilter, Hooks};
use crate::model::HookedGpt2;
use crate::output;
use crate::seam::SeamDevice;

/// Runs `tokens` (one sequence) and returns each head's pattern `[dest, src]`.
pub fn attention_patterns<D: SeamDevice>(
    model: &HookedGpt2<D>,
    tokens: &[u32],
    heads: &[(usize, usize)],
) -> Result<Vec<Array2<f32>>> {
    let mut layers: Vec<usize> = heads.iter().map(|&(l, _)| l).collect();
    layers.sort_unstable();
    layers.dedup();
    let names: Vec<String> = layers
        .iter()
        .map(|&l| block_hook(l, "attn.hook_pattern"))
        .collect();
    let batch = Array2::from_shape_vec((1, tokens.len()), tokens.to_vec())
        .map_err(|e| Error::Other(format!("attention tokens: {e}")))?;
    let mut hooks = Hooks::caching(HookFilter::names(names));
    model.run_hooks(&batch, &mut hooks)?;
    let cache = hooks.take_cache();
    heads
        .iter()
        .map(|&(l, h)| {
            let name = block_hook(l, "attn.hook_pattern");
            let p = cache
                .get(&name)?
                .view()
                .into_dimensionality::<Ix4>()
                .map_err(|e| Error::Hook {
                    name: name.clone(),
                    msg: format!("unexpected shape: {e}"),
                })?;
            if h >= p.dim().1 {
                return Err(Error::Other(format!("head {l}.{h} is outside the model")));
            }
            Ok(p.slice(s![0, h, .., ..]).to_owned())
        })
        .collect()
}

#[derive(Serialize)]
struct PageData<'a> {
    title: &'a str,
    heads: Vec<String>,
    sequences: Vec<SequenceData<'a>>,
}

#[derive(Serialize)]
struct SequenceData<'a> {
    /// Which sequence of the dataset (its row).
    index: usize,
    tokens: &'a [String],
    /// `patterns[head][dest][src]`, rounded to 4 decimals to keep the page small.
    patterns: Vec<Vec<Vec<f32>>>,
}

/// One sequence of an attention page: its row in the dataset, its tokens (display text, one
/// per position) and each head's `[dest, src]` pattern.
pub struct PageSequence {
    pub index: usize,
    pub tokens: Vec<String>,
    pub patterns: Vec<Array2<f32>>,
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON that can sit inside a `<script>` element: `<`, `>` and `&` only occur inside JSON
/// strings, where their `\u` escapes mean the same, and no `</script>` can end it early.
pub fn script_json<T: Serialize>(value: &T) -> Result<String> {
    let json = serde_json::to_string(value).map_err(|e| Error::Other(e.to_string()))?;
    Ok(json
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026"))
}

/// The page: for each sequence, its tokens and each head's `[dest, src]` pattern.
pub fn attention_html(
    title: &str,
    heads: &[(usize, usize)],
    sequences: &[PageSequence],
) -> Result<String> {
    if sequences.is_empty() {
        return Err(Error::Other("attention page: no sequences".into()));
    }
    for sq in sequences {
        let n = sq.tokens.len();
        if heads.len() != sq.patterns.len() || sq.patterns.iter().any(|p| p.dim() != (n, n)) {
            return Err(Error::Other(format!(
                "attention page, sequence {}: {} heads, {} patterns, {n} tokens do not match",
                sq.index,
                heads.len(),
                sq.patterns.len()
            )));
        }
    }
    let round = |p: &Array2<f32>| -> Vec<Vec<f32>> {
        p.rows()
            .into_iter()
            .map(|r| r.iter().map(|&x| (x * 1e4).round() / 1e4).collect())
            .collect()
    };
    let data = PageData {
        title,
        heads: heads.iter().map(|(l, h)| format!("{l}.{h}")).collect(),
        sequences: sequences
            .iter()
            .map(|sq| SequenceData {
                index: sq.index,
                tokens: &sq.tokens,
                patterns: sq.patterns.iter().map(round).collect(),
            })
            .collect(),
    };
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n\
         <h1>{title}</h1>\n\
         <p class=\"note\">Rows are destination tokens (queries), columns are source tokens \
         (keys); each row sums to 1. Pick a sequence and a head; hover a token or a row to see \
         where it attends.</p>\n\
         <div id=\"seqs\" role=\"tablist\" aria-label=\"sequences\"></div>\n\
         <div id=\"heads\" role=\"tablist\" aria-label=\"heads\"></div>\n\
         <h2>Tokens</h2>\n<div id=\"tokens\"></div>\n\
         <h2 id=\"pattern-title\">Pattern</h2>\n\
         <div id=\"legend\"><span>0</span><span class=\"bar\"></span><span>1</span></div>\n\
         <div id=\"grid-wrap\"><table id=\"grid\"></table></div>\n\
         <script id=\"data\" type=\"application/json\">{json}</script>\n\
         <script>\n{JS}</script>\n</body>\n</html>\n",
        title = html_escape(title),
        json = script_json(&data)?,
    ))
}

/// Makes `attention_<dataset>.html` for `heads` on the dataset's first `sequences`
/// sequences (each without its right padding).
pub fn write_attention_page<D: SeamDevice>(
    out_dir: &Path,
    model: &HookedGpt2<D>,
    dataset: &crate::data::Dataset,
    heads: &[(usize, usize)],
    sequences: usize,
    token_text: &dyn Fn(u32) -> String,
) -> Result<PathBuf> {
    if dataset.n_sequences() == 0 {
        return Err(Error::Other(format!("dataset {} is empty", dataset.name)));
    }
    let shown = sequences.clamp(1, dataset.n_sequences());
    let pages = (0..shown)
        .map(|seq| {
            let len = dataset
                .lengths
                .get(seq)
                .copied()
                .unwrap_or(dataset.seq_len());
            let ids: Vec<u32> = dataset.tokens.row(seq).iter().take(len).copied().collect();
            Ok(PageSequence {
                index: seq,
                patterns: attention_patterns(model, &ids, heads)?,
                tokens: ids.iter().map(|&t| token_text(t)).collect(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let title = format!("Attention patterns: dataset {}", dataset.name);
    let html = attention_html(&title, heads, &pages)?;
    let path = out_dir.join(format!(
        "attention_{}.html",
        super::file_part(&dataset.name)
    ));
    output::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

const CSS: &str = r#"body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 6px; }
h2 { font-size: 15px; margin: 18px 0 6px; }
.note { color: #555; font-size: 13px; max-width: 60em; }
#heads { display: flex; flex-wrap: wrap; gap: 8px; }
#seqs { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 10px; }
#seqs button { padding: 4px 8px; border: 2px solid #ccc; border-radius: 6px; background: #fff;
  cursor: pointer; font: 13px system-ui, sans-serif; }
#seqs button[aria-selected="true"] { border-color: #2166ac; background: #eef4fb; }
#heads button { display: flex; flex-direction: column; align-items: center; gap: 4px;
  padding: 6px; border: 2px solid #ccc; border-radius: 6px; background: #fff;
  cursor: pointer; font: 13px monospace; }
#heads button[aria-selected="true"] { border-color: #2166ac; background: #eef4fb; }
#heads canvas { width: 72px; height: 72px; image-rendering: pixelated; border: 1px solid #ddd; }
#tokens { line-height: 2.1; font: 14px monospace; max-width: 70em; }
#tokens span { padding: 2px 1px; margin: 0 1px; border-radius: 3px; white-space: pre;
  border: 1px solid transparent; cursor: default; }
#tokens span.focus { border-color: #b2182b; }
#legend { display: flex; align-items: center; gap: 6px; font-size: 12px; margin-bottom: 6px; }
#legend .bar { width: 160px; height: 10px; border: 1px solid #ccc;
  background: linear-gradient(to right, rgb(255,255,255), rgb(33,102,172)); }
#grid-wrap { overflow: auto; max-width: 100%; }
#grid { border-collapse: collapse; font: 11px monospace; }
#grid td { width: 22px; height: 22px; min-width: 22px; padding: 0; border: 1px solid #f2f2f2; }
#grid th { font-weight: normal; white-space: pre; padding: 0 4px; color: #333; }
#grid thead th { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left;
  padding: 4px 0; }
#grid tbody th { text-align: right; }
#grid tr.focus th { color: #b2182b; font-weight: bold; }
#grid tr.focus td { border-top: 1px solid #b2182b; border-bottom: 1px solid #b2182b; }
"#;

const JS: &str = r##"(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("data").textContent);
  var seq = null;
  var n = 0;
  var currentSeq = 0;
  var current = 0;
  var focus = -1;

  // White to RdBu's dark blue: attention is in [0, 1].
  function colour(a) {
    a = Math.max(0, Math.min(1, a));
    var r = Math.round(255 + (33 - 255) * a);
    var g = Math.round(255 + (102 - 255) * a);
    var b = Math.round(255 + (172 - 255) * a);
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  function show(t) {
    return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function clear(el) {
    while (el.firstChild) { el.removeChild(el.firstChild); }
  }

  var seqsEl = document.getElementById("seqs");
  var seqButtons = data.sequences.map(function (sq, s) {
    var b = document.createElement("button");
    b.type = "button";
    b.setAttribute("role", "tab");
    b.textContent = "sequence " + sq.index;
    b.title = sq.tokens.join("");
    b.addEventListener("click", function () { selectSeq(s); });
    seqsEl.appendChild(b);
    return b;
  });

  var headsEl = document.getElementById("heads");
  var tokensEl = document.getElementById("tokens");
  var grid = document.getElementById("grid");
  var buttons = [];
  var spans = [];
  var rows = [];
  var cells = [];

  // Builds the head thumbnails, the tokens and the grid of sequence `s`.
  function build(s) {
    seq = data.sequences[s];
    n = seq.tokens.length;
    clear(headsEl);
    buttons = data.heads.map(function (name, i) {
      var b = document.createElement("button");
      b.type = "button";
      b.setAttribute("role", "tab");
      b.title = "head " + name;
      var c = document.createElement("canvas");
      c.width = n;
      c.height = n;
      var ctx = c.getContext("2d");
      if (ctx) {
        for (var q = 0; q < n; q++) {
          for (var k = 0; k < n; k++) {
            ctx.fillStyle = colour(seq.patterns[i][q][k]);
            ctx.fillRect(k, q, 1, 1);
          }
        }
      }
      var label = document.createElement("span");
      label.textContent = name;
      b.appendChild(c);
      b.appendChild(label);
      b.addEventListener("click", function () { select(i); });
      headsEl.appendChild(b);
      return b;
    });

    clear(tokensEl);
    spans = seq.tokens.map(function (t, i) {
      var sp = document.createElement("span");
      sp.textContent = show(t);
      sp.title = i + ": " + JSON.stringify(t);
      sp.addEventListener("mouseenter", function () { setFocus(i); });
      sp.addEventListener("mouseleave", function () { setFocus(-1); });
      tokensEl.appendChild(sp);
      return sp;
    });

    clear(grid);
    var thead = document.createElement("thead");
    var hr = document.createElement("tr");
    hr.appendChild(document.createElement("th"));
    seq.tokens.forEach(function (t) {
      var th = document.createElement("th");
      th.textContent = show(t);
      hr.appendChild(th);
    });
    thead.appendChild(hr);
    grid.appendChild(thead);
    var tbody = document.createElement("tbody");
    rows = [];
    cells = [];
    for (var q = 0; q < n; q++) {
      var tr = document.createElement("tr");
      var th = document.createElement("th");
      th.textContent = show(seq.tokens[q]);
      tr.appendChild(th);
      var row = [];
      for (var k = 0; k < n; k++) {
        var td = document.createElement("td");
        tr.appendChild(td);
        row.push(td);
      }
      (function (q) {
        tr.addEventListener("mouseenter", function () { setFocus(q); });
        tr.addEventListener("mouseleave", function () { setFocus(-1); });
      })(q);
      tbody.appendChild(tr);
      rows.push(tr);
      cells.push(row);
    }
    grid.appendChild(tbody);
  }

  function paintTokens() {
    var p = seq.patterns[current];
    spans.forEach(function (sp, k) {
      sp.classList.toggle("focus", k === focus);
      sp.style.background = focus >= 0 && k <= focus ? colour(p[focus][k]) : "";
      sp.style.color = focus >= 0 && k <= focus && p[focus][k] > 0.55 ? "#fff" : "";
    });
    rows.forEach(function (r, q) { r.classList.toggle("focus", q === focus); });
  }
  function setFocus(q) {
    focus = q;
    paintTokens();
  }
  function select(i) {
    current = i;
    buttons.forEach(function (b, j) { b.setAttribute("aria-selected", j === i ? "true" : "false"); });
    document.getElementById("pattern-title").textContent =
      "Pattern of head " + data.heads[i] + ", sequence " + seq.index;
    var p = seq.patterns[i];
    for (var q = 0; q < n; q++) {
      for (var k = 0; k < n; k++) {
        var td = cells[q][k];
        td.style.background = k <= q ? colour(p[q][k]) : "#fafafa";
        td.title = k <= q ? JSON.stringify(seq.tokens[q]) + " \u2192 " +
          JSON.stringify(seq.tokens[k]) + ": " + p[q][k].toFixed(3) : "";
      }
    }
    paintTokens();
  }
  function selectSeq(s) {
    currentSeq = s;
    seqButtons.forEach(function (b, j) { b.setAttribute("aria-selected", j === s ? "true" : "false"); });
    focus = -1;
    build(s);
    select(Math.min(current, data.heads.length - 1));
  }
  // `#seq=2&head=1&token=5` (or `token=last`) opens with that sequence (its place in the
  // selector) and head selected and that token focused: for links, and for
  // scripts/check_pages.py, which renders the hover state so.
  function fromHash() {
    var params = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i > 0) { params[kv.slice(0, i)] = kv.slice(i + 1); }
    });
    var s = params.seq === "last" ? data.sequences.length - 1 : parseInt(params.seq, 10);
    if (s >= 0 && s < data.sequences.length && s !== currentSeq) { selectSeq(s); }
    var head = parseInt(params.head, 10);
    if (head >= 0 && head < data.heads.length) { select(head); }
    var token = params.token === "last" ? n - 1 : parseInt(params.token, 10);
    if (token >= 0 && token < n) { setFocus(token); }
  }
  if (data.heads.length > 0 && data.sequences.length > 0) {
    selectSeq(0);
    fromHash();
    window.addEventListener("hashchange", fromHash);
  }
})();
"##;
