//! Drawing helpers shared by the report's SVG figures: the diverging colour scale, the colour
//! bar, cell text formatting and font sizes.
//!
//! Owns: how a value becomes a colour (ColorBrewer RdBu, centred on 0, symmetric around it:
//! the notebook's `imshow(..., zmin=-zmax, zmax=zmax)`), which text colour stays readable on
//! it, how a cell value is written (two decimals, like plotly's `text_auto=".2f"`), and text
//! cleaning for SVG. Must not: decide what a figure shows or write files.
//!
//! Every figure is drawn with plotters' SVG backend: plotters escapes text itself, and the
//! cleaning here only replaces characters XML cannot carry at all (control characters).

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

/// A value with two decimals (`NaN`, `inf` and `-inf` as such).
pub fn two_decimals(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:.2}")
    }
}

/// A table cell as a figure shows it: the number the CSV holds (its text, parsed back, so
/// the figure agrees with the CSV digit for digit), with two decimals.
pub fn cell_text(v: &Value) -> String {
    let shown = v.to_string();
    match shown.parse::<f64>() {
        Ok(x) => two_decimals(x),
        Err(_) => shown,
    }
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

/// Draws a vertical colour bar for `[-zmax, zmax]` in `area`, labelled `label`, with its
/// top and bottom `top`/`bottom` pixels in from the area's edges (to line up with panels).
pub fn colour_bar(area: &Area, zmax: f64, label: &str, top: u32, bottom: u32) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(clean_text(label), (LABEL_FONT, px(CAPTION_PX)))
        .margin_top(top)
        .margin_bottom(bottom)
        .margin_left(6)
        .right_y_label_area_size(56)
        .build_cartesian_2d(0f64..1f64, -zmax..zmax)
        .map_err(svg_err)?;
    let fmt = |v: &f64| two_decimals(*v);
    // About one label per 40 pixels of bar, so short bars do not pile labels up.
    let bar_px = area.dim_in_pixel().1.saturating_sub(top + bottom + 25);
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .x_labels(0)
        .y_labels((bar_px / 40).clamp(2, 9) as usize)
        .y_label_formatter(&fmt)
        .label_style((LABEL_FONT, px(11.0)))
        .draw()
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
    Ok(())
}

/// The chart both grids (head heatmaps, per-token views) draw into: integer cells, y downwards.
pub type GridChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

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
    fn cells_show_the_csv_number() {
        assert_eq!(cell_text(&Value::Float(-0.126)), "-0.13");
        assert_eq!(cell_text(&Value::Float(f64::NAN)), "NaN");
        assert_eq!(cell_text(&Value::Int(3)), "3.00");
        assert_eq!(clean_text("a\u{1}<b"), "a\u{fffd}<b");
    }
}
