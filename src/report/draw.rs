//! Drawing helpers shared by the report's SVG figures: the diverging colour scale, the colour
//! bar, cell text formatting and font sizes.
//!
//! Owns: how a value becomes a colour (ColorBrewer RdBu, centred on 0, symmetric around it:
//! the notebook's `imshow(..., zmin=-zmax, zmax=zmax)`), which text colour stays readable on
//! it, how numbers are written ([`NumberFormat`]: one precision per figure, chosen from its
//! range, so `0.0008` is `8.1e-4` and not `0.00`; colour-bar ticks at round values, each
//! label distinct), how wide text is, and text cleaning for SVG. Must not: decide what a
//! figure shows or write files.
//!
//! Every figure is drawn with plotters' SVG backend: plotters escapes text itself, and the
//! cleaning here only replaces characters XML cannot carry at all (control characters).

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::output::Value;

/// The drawing area type every figure uses.
pub type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// ColorBrewer's RdBu (11 classes), from most negative (dark red) to most positive (dark
/// blue): the scale the notebook's `imshow` uses, so suppression (negative) reads as red.
const RDBU: [(u8, u8, u8); 11] = [
    (103, 0, 31),
    (178, 24, 43),
    (214, 96, 77),
    (244, 165, 130),
    (253, 219, 199),
    (247, 247, 247),
    (209, 229, 240),
    (146, 197, 222),
    (67, 147, 195),
    (33, 102, 172),
    (5, 48, 97),
];

/// Cells with no value (a head not in the run, padding) and NaN cells.
pub const MISSING: RGBColor = RGBColor(224, 224, 224);

/// Cell text: monospace, so the value labels are aligned and (for tests and readers) told
/// apart from axis labels, which are sans-serif.
pub const CELL_FONT: &str = "monospace";
pub const LABEL_FONT: &str = "sans-serif";

/// plotters' SVG backend writes `font-size = size / 1.24`; this gives a font of `px` pixels.
pub fn px(px: f64) -> f64 {
    px * 1.24
}

/// Maps a plotters drawing error to the crate's error.
pub fn svg_err<E: std::fmt::Display>(e: E) -> Error {
    Error::Other(format!("drawing an SVG: {e}"))
}

/// The colour of `v` on a scale from `-zmax` (dark red) through 0 (near white) to `zmax`
/// (dark blue). Non-finite values get [`MISSING`].
pub fn diverging(v: f64, zmax: f64) -> RGBColor {
    if !v.is_finite() {
        return MISSING;
    }
    let zmax = if zmax > 0.0 && zmax.is_finite() {
        zmax
    } else {
        1.0
    };
    let t = ((v / zmax).clamp(-1.0, 1.0) + 1.0) / 2.0 * (RDBU.len() - 1) as f64;
    let i = (t.floor() as usize).min(RDBU.len() - 2);
    let f = t - i as f64;
    let (a, b) = (RDBU[i], RDBU[i + 1]);
    let mix = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Black or white, whichever reads better on `bg` (relative luminance).
pub fn text_on(bg: RGBColor) -> RGBColor {
    let lum = 0.2126 * bg.0 as f64 + 0.7152 * bg.1 as f64 + 0.0722 * bg.2 as f64;
    if lum < 140.0 {
        WHITE
    } else {
        BLACK
    }
}

/// The largest |v| over finite values; 1 when there is none (an all-zero or all-NaN figure
/// still gets a valid scale).
pub fn abs_max(values: impl IntoIterator<Item = f64>) -> f64 {
    let m = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    if m > 0.0 {
        m
    } else {
        1.0
    }
}

/// A value with two decimals (`NaN`, `inf` and `-inf` as such). Figures use
/// [`NumberFormat`], which picks the precision from the figure's range.
pub fn two_decimals(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:.2}")
    }
}

/// A table cell with two decimals (see [`two_decimals`]); figures use [`cell_label`].
pub fn cell_text(v: &Value) -> String {
    let shown = v.to_string();
    match shown.parse::<f64>() {
        Ok(x) => two_decimals(x),
        Err(_) => shown,
    }
}

/// How every number of one figure is written, chosen once from the figure's largest |value|
/// so all labels share a precision and the largest shows three significant digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberFormat {
    /// This many decimals: `2.97`, `-0.125`, `0.0123`, `123`.
    Fixed(usize),
    /// Scientific with this many mantissa decimals, for small or large ranges: `1.2e-3`.
    Sci(usize),
}

impl NumberFormat {
    /// Fixed decimals for `0.01 <= zmax < 10_000` (three significant digits at `zmax`),
    /// else scientific with two significant digits.
    pub fn for_range(zmax: f64) -> Self {
        if !(zmax.is_finite() && zmax > 0.0) {
            return NumberFormat::Fixed(2);
        }
        let e = zmax.log10().floor() as i32;
        if (-2..4).contains(&e) {
            NumberFormat::Fixed((2 - e).max(0) as usize)
        } else {
            NumberFormat::Sci(1)
        }
    }

    /// `v` in this format. Zero is `0`; a value that would round to zero (and so read as
    /// `0.00` or `-0.00`) is written with one significant digit instead (`-4e-3`), so no
    /// label claims a zero the data does not hold and no label is `-0`.
    pub fn format(&self, v: f64) -> String {
        if v.is_nan() {
            return "NaN".into();
        }
        if v.is_infinite() {
            return if v > 0.0 { "inf" } else { "-inf" }.into();
        }
        if v == 0.0 {
            return "0".into();
        }
        let s = match *self {
            NumberFormat::Fixed(d) => format!("{v:.d$}"),
            NumberFormat::Sci(d) => format!("{v:.d$e}"),
        };
        if s.parse::<f64>() == Ok(0.0) {
            format!("{v:.0e}")
        } else {
            s
        }
    }
}

/// A cell's hover text: an invisible box over the cell carrying an SVG `<title>`, so a
/// browser shows the exact value and its key under the cursor (plotly's `imshow` does the
/// same). Pixel coordinates of the whole figure.
#[derive(Debug, Clone)]
pub struct Hover {
    pub top_left: (i32, i32),
    pub bottom_right: (i32, i32),
    pub title: String,
}

impl Hover {
    /// The box of the data rectangle `[(x0, y0), (x1, y1)]` of `chart`.
    pub fn over<DB: DrawingBackend>(
        chart: &ChartContext<DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
        rect: [(f64, f64); 2],
        title: String,
    ) -> Self {
        let (a, b) = (chart.backend_coord(&rect[0]), chart.backend_coord(&rect[1]));
        Hover {
            top_left: (a.0.min(b.0), a.1.min(b.1)),
            bottom_right: (a.0.max(b.0), a.1.max(b.1)),
            title,
        }
    }
}

/// Escapes text for SVG element content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in clean_text(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Adds the hover boxes to a finished SVG, on top of everything (a box filled with opacity 0
/// still takes the pointer, so its `<title>` shows).
pub fn add_hovers(svg: &mut String, hovers: &[Hover]) -> Result<()> {
    let end = svg
        .rfind("</svg>")
        .ok_or_else(|| Error::Other("internal error: SVG without </svg>".into()))?;
    let mut g = String::from("<g class=\"hover\" fill=\"#000\" fill-opacity=\"0\">\n");
    for h in hovers {
        let (x0, y0) = h.top_left;
        let (x1, y1) = h.bottom_right;
        g.push_str(&format!(
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{}\" height=\"{}\"><title>{}</title></rect>\n",
            x1 - x0,
            y1 - y0,
            xml_escape(&h.title)
        ));
    }
    g.push_str("</g>\n");
    svg.insert_str(end, &g);
    Ok(())
}

/// A table cell as a figure shows it: the number the CSV holds (its text, parsed back, so
/// the figure agrees with the CSV) in the figure's format; text cells as they are.
pub fn cell_label(v: &Value, fmt: NumberFormat) -> String {
    let shown = v.to_string();
    match shown.parse::<f64>() {
        Ok(x) => fmt.format(x),
        Err(_) => shown,
    }
}

/// Round tick values for a scale from `-zmax` to `zmax`: multiples of 1, 2, 2.5 or 5 x 10^k,
/// symmetric around (and including) 0, at most `max_n` of them (and at least 3).
pub fn nice_ticks(zmax: f64, max_n: usize) -> Vec<f64> {
    let zmax = if zmax.is_finite() && zmax > 0.0 {
        zmax
    } else {
        1.0
    };
    let per_side = (max_n.max(3) - 1) / 2;
    let e = (zmax / per_side as f64).log10().floor() as i32;
    // How many steps of `m` x 10^e fit in zmax (with slack for zmax itself being a tick).
    let fits = |m: f64| (zmax / (m * 10f64.powi(e)) + 1e-9).floor() as i64;
    let m = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .find(|&m| fits(m) <= per_side as i64)
        .unwrap_or(10.0);
    let k = fits(m);
    // Each tick is parsed from its decimal form (`3e-1`), so it is the f64 nearest the round
    // number, never 0.30000000000000004.
    (-k..=k)
        .map(|i| format!("{}e{e}", i as f64 * m).parse().unwrap_or(0.0))
        .collect()
}

/// Labels for `ticks` with the fewest digits that write every tick exactly, so no two
/// labels read the same (`0.0005`, `0.001`, `0.0015`, or `5e-4`, `1e-3`, `1.5e-3`).
pub fn tick_labels(ticks: &[f64]) -> Vec<String> {
    let zmax = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let base = NumberFormat::for_range(zmax);
    let exact = |f: NumberFormat| {
        let labels: Vec<String> = ticks.iter().map(|&t| f.format(t)).collect();
        let ok = labels.iter().zip(ticks).all(|(l, &t)| {
            l.parse::<f64>()
                .is_ok_and(|x| (x - t).abs() <= 1e-9 * zmax.max(f64::MIN_POSITIVE))
        });
        ok.then_some(labels)
    };
    let candidates: Vec<NumberFormat> = match base {
        NumberFormat::Fixed(_) => (0..=8).map(NumberFormat::Fixed).collect(),
        NumberFormat::Sci(_) => (0..=4).map(NumberFormat::Sci).collect(),
    };
    candidates
        .into_iter()
        .find_map(exact)
        .unwrap_or_else(|| ticks.iter().map(|&t| format!("{t:e}")).collect())
}

/// Roughly how many pixels `text` takes in a sans-serif font of `size_px`: Helvetica's
/// (= Arial's, Liberation Sans's) advance widths, plus 8% for wider fallbacks such as
/// DejaVu Sans. For sizing canvases to their text: a few pixels too wide reads fine, a cut
/// title does not.
pub fn text_px(text: &str, size_px: f64) -> u32 {
    let em: f64 = text
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '\'' | '|' => 0.222,
            ' ' | '.' | ',' | ':' | ';' | '!' | 'f' | 't' | '/' | '\\' | 'I' => 0.278,
            'r' | '-' | '(' | ')' | '[' | ']' => 0.333,
            'c' | 'k' | 's' | 'v' | 'x' | 'y' | 'z' | 'J' => 0.5,
            'm' => 0.833,
            'w' => 0.722,
            'M' => 0.833,
            'W' => 0.944,
            c if c.is_ascii_uppercase() => 0.667,
            c if c.is_ascii() => 0.556,
            _ => 1.0,
        })
        .sum();
    (em * 1.08 * size_px).ceil() as u32
}

/// Pixels of `text` in the monospace cell font of `size_px`.
pub fn mono_px(text: &str, size_px: f64) -> u32 {
    (text.chars().count() as f64 * 0.61 * size_px).ceil() as u32
}

/// The number a cell's text holds (for colours), NaN when it holds none.
pub fn cell_number(v: &Value) -> f64 {
    v.to_string().parse::<f64>().unwrap_or(f64::NAN)
}

/// Text safe for XML: control characters (which XML 1.0 cannot carry, even escaped) become
/// U+FFFD. Markup characters are left alone: plotters escapes them.
pub fn clean_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// A label for an integer axis tick placed at a cell's centre (blank between cells).
pub fn int_tick(v: f64) -> String {
    if (v - v.round()).abs() > 1e-6 {
        String::new()
    } else {
        format!("{}", v.round() as i64)
    }
}

/// Text centred at a point, for cell labels.
pub fn centred(font: &str, size_px: f64, colour: RGBColor) -> TextStyle<'static> {
    let family: &'static str = if font == CELL_FONT {
        CELL_FONT
    } else {
        LABEL_FONT
    };
    TextStyle {
        font: (family, px(size_px)).into_font(),
        color: colour.to_backend_color(),
        pos: Pos::new(HPos::Center, VPos::Center),
    }
}

/// Draws `text` with its top-left corner at `(x, y)` of `area` (sans-serif, `size_px`).
/// Wide figures put their titles at the left, where a reader scrolling from the start
/// sees them, rather than centred thousands of pixels away.
pub fn left_text(area: &Area, text: &str, x: i32, y: i32, size_px: f64) -> Result<()> {
    let style = TextStyle {
        font: (LABEL_FONT, px(size_px)).into_font(),
        color: BLACK.to_backend_color(),
        pos: Pos::new(HPos::Left, VPos::Top),
    };
    area.draw_text(&clean_text(text), &style, (x, y))
        .map_err(svg_err)
}

/// The smallest plot height (pixels) a figure gets, so its colour bar has room for labels
/// even when the grid has one or two rows.
pub const MIN_PLOT_PX: u32 = 180;

/// Height in pixels a ChartBuilder caption of `size_px` takes (text plus its padding), so
/// a colour bar drawn beside captioned panels lines up with them.
pub const CAPTION_PX: f64 = 15.0;

/// Width of the area [`colour_bar`] needs for `label` and `zmax`'s tick labels.
pub fn colour_bar_width(zmax: f64, label: &str) -> u32 {
    let ticks = tick_labels(&nice_ticks(zmax, 9));
    let widest = ticks.iter().map(|t| text_px(t, 11.0)).max().unwrap_or(0);
    // bar 6 + 30 px, tick labels beside it, or the caption, whichever is wider.
    (6 + 30 + 10 + widest + 8).max(6 + text_px(label, CAPTION_PX) + 8)
}

/// Draws a vertical colour bar for `[-zmax, zmax]` in `area`, labelled `label`, with its
/// top and bottom `top`/`bottom` pixels in from the area's edges (to line up with panels).
/// Ticks sit at round values ([`nice_ticks`]), each label distinct ([`tick_labels`]); size
/// the area with [`colour_bar_width`] so the label is not cut.
pub fn colour_bar(area: &Area, zmax: f64, label: &str, top: u32, bottom: u32) -> Result<()> {
    let (w, _) = area.dim_in_pixel();
    // About one label per 40 pixels of bar, so short bars do not pile labels up.
    let bar_px = area.dim_in_pixel().1.saturating_sub(top + bottom + 25);
    let ticks = nice_ticks(zmax, (bar_px / 40).clamp(3, 9) as usize);
    let labels = tick_labels(&ticks);
    // The bar is 30 px wide, 6 px in; tick marks and labels are drawn beside it by hand
    // (plotters' f64 axis would pick its own ticks and format them with two decimals).
    // The caption row is plotters' (so the bar's top lines up with captioned panels beside
    // it), but blank: the label is drawn from the bar's left edge, where the area is sized
    // for it, rather than centred on the 30 px bar and spilling onto the panels.
    let mut chart = ChartBuilder::on(area)
        .caption(" ", (LABEL_FONT, px(CAPTION_PX)))
        .margin_top(top)
        .margin_bottom(bottom)
        .margin_left(6)
        .margin_right(w.saturating_sub(6 + 30))
        .build_cartesian_2d(0f64..1f64, -zmax..zmax)
        .map_err(svg_err)?;
    // 64 bands: smooth enough to read as a gradient, few enough to keep the file small.
    let n = 64;
    let step = 2.0 * zmax / n as f64;
    chart
        .draw_series((0..n).map(|i| {
            let lo = -zmax + i as f64 * step;
            Rectangle::new(
                [(0.0, lo), (1.0, lo + step)],
                diverging(lo + step / 2.0, zmax).filled(),
            )
        }))
        .map_err(svg_err)?;
    left_text(area, label, 6, top as i32, CAPTION_PX)?;
    let base = area.get_base_pixel();
    let style = TextStyle {
        font: (LABEL_FONT, px(11.0)).into_font(),
        color: BLACK.to_backend_color(),
        pos: Pos::new(HPos::Left, VPos::Center),
    };
    for (t, l) in ticks.iter().zip(&labels) {
        let (x, y) = chart.backend_coord(&(1.0, *t));
        let (x, y) = (x - base.0, y - base.1);
        area.draw(&PathElement::new(vec![(x, y), (x + 4, y)], BLACK))
            .map_err(svg_err)?;
        area.draw_text(l, &style, (x + 7, y)).map_err(svg_err)?;
    }
    Ok(())
}

/// The chart both grids (head heatmaps, per-token views) draw into: integer cells, y downwards.
pub type GridChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A captioned chart of an `nx` x `ny` grid of unit cells centred on integers, row 0 at the
/// top (as `imshow` shows a matrix, hence the negated y axis), with `label_areas` (x, y)
/// pixels for the tick labels: the frame of every per-dataset heatmap panel.
pub fn grid_chart<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    (nx, ny): (usize, usize),
    margin: u32,
    (x_label, y_label): (u32, u32),
) -> Result<GridChart<'a, 'b>> {
    ChartBuilder::on(area)
        .caption(clean_text(caption), (LABEL_FONT, px(CAPTION_PX)))
        .margin(margin)
        .x_label_area_size(x_label)
        .y_label_area_size(y_label)
        .build_cartesian_2d(-0.5f64..(nx as f64 - 0.5), -(ny as f64 - 0.5)..0.5f64)
        .map_err(svg_err)
}

/// Axes of an `nx` x `ny` grid of unit cells centred on integers (row 0 at the top): integer
/// ticks, no mesh lines, axis titles.
pub fn grid_axes(
    chart: &mut GridChart,
    (nx, ny): (usize, usize),
    (x_desc, y_desc): (&str, &str),
    label_px: f64,
    max_ticks: usize,
) -> Result<()> {
    let x_tick = |v: &f64| int_tick(*v);
    let y_tick = |v: &f64| int_tick(-*v);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(nx.min(max_ticks))
        .y_labels(ny.min(max_ticks))
        .x_label_formatter(&x_tick)
        .y_label_formatter(&y_tick)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((LABEL_FONT, px(label_px)))
        .axis_desc_style((LABEL_FONT, px(label_px + 1.0)))
        .draw()
        .map_err(svg_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_centred_and_symmetric() {
        assert_eq!(diverging(0.0, 2.0), RGBColor(247, 247, 247));
        assert_eq!(diverging(-2.0, 2.0), RGBColor(103, 0, 31));
        assert_eq!(diverging(5.0, 2.0), RGBColor(5, 48, 97));
        assert_eq!(diverging(f64::NAN, 2.0), MISSING);
        assert_eq!(text_on(RGBColor(103, 0, 31)), WHITE);
        assert_eq!(text_on(RGBColor(247, 247, 247)), BLACK);
    }

    #[test]
    fn numbers_get_the_precision_of_their_range() {
        let f = NumberFormat::for_range;
        assert_eq!(f(2.97), NumberFormat::Fixed(2));
        assert_eq!(f(0.5), NumberFormat::Fixed(3));
        assert_eq!(f(0.0123), NumberFormat::Fixed(4));
        assert_eq!(f(0.0023), NumberFormat::Sci(1));
        assert_eq!(f(12345.0), NumberFormat::Sci(1));
        assert_eq!(f(0.0023).format(0.0008061306), "8.1e-4");
        assert_eq!(f(0.0023).format(-0.00123), "-1.2e-3");
        assert_eq!(f(2.97).format(-2.968), "-2.97");
        // Never -0.00: a value too small for the precision keeps one significant digit.
        assert_eq!(f(2.97).format(-0.0004), "-4e-4");
        assert_eq!(f(2.97).format(0.0), "0");
        assert_eq!(f(2.97).format(-0.0), "0");
        assert_eq!(f(2.97).format(f64::NAN), "NaN");
    }

    #[test]
    fn ticks_are_round_symmetric_and_distinct() {
        for zmax in [0.0023, 0.0128, 0.3, 1.0, 2.97, 3.0, 47.0, 1e-7, 5e5] {
            for n in [3, 5, 9] {
                let t = nice_ticks(zmax, n);
                assert!(t.len() >= 3 && t.len() <= n.max(3), "{zmax} {n}: {t:?}");
                assert!(t.contains(&0.0));
                assert!(t.iter().all(|v| v.abs() <= zmax * (1.0 + 1e-9)), "{t:?}");
                assert!(t.iter().all(|v| t.contains(&-v)), "{t:?}");
                let l = tick_labels(&t);
                let mut d = l.clone();
                d.sort();
                d.dedup();
                assert_eq!(d.len(), l.len(), "{zmax} {n}: {l:?}");
                assert!(!l
                    .iter()
                    .any(|s| s.starts_with("-0") && s.parse() == Ok(0.0)));
            }
        }
        let small = [
            "-2.0e-3", "-1.5e-3", "-1.0e-3", "-5.0e-4", "0", "5.0e-4", "1.0e-3",
        ];
        assert_eq!(tick_labels(&nice_ticks(0.0023, 9))[..7], small);
        assert_eq!(
            tick_labels(&nice_ticks(2.97, 7)),
            ["-2", "-1", "0", "1", "2"]
        );
    }

    #[test]
    fn cells_show_the_csv_number() {
        assert_eq!(cell_text(&Value::Float(-0.126)), "-0.13");
        assert_eq!(
            cell_label(&Value::Float(-0.126), NumberFormat::Fixed(3)),
            "-0.126"
        );
        assert_eq!(cell_text(&Value::Float(f64::NAN)), "NaN");
        assert_eq!(cell_text(&Value::Int(3)), "3.00");
        assert_eq!(clean_text("a\u{1}<b"), "a\u{fffd}<b");
    }
}
