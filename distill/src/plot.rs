//! `distill plot`: a PNG of a run's train and eval loss and its learning rate, from
//! `metrics.jsonl`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// The font that labels the charts, embedded so that plots render alike on machines without
/// system fonts (CI images, containers). See `distill/assets/FONT-LICENSE.txt`.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}, line {line}: {message}")]
    Metrics { path: PathBuf, line: usize, message: String },
    #[error("{0}: no training steps logged yet")]
    Empty(PathBuf),
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// The curves of one run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Curves {
    /// (step, train loss)
    pub train_loss: Vec<(f64, f64)>,
    /// (step, eval loss)
    pub eval_loss: Vec<(f64, f64)>,
    /// (step, learning rate)
    pub learning_rate: Vec<(f64, f64)>,
    /// The largest `peak_memory_bytes` logged.
    pub peak_memory_bytes: Option<u64>,
}

/// Reads a run's `metrics.jsonl`: train lines carry `loss` and `learning_rate`, eval lines
/// `eval_loss`; anything else on a line is ignored.
pub fn read_metrics(path: &Path) -> Result<Curves, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io { path: path.into(), source })?;
    let mut curves = Curves::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| PlotError::Metrics { path: path.into(), line: index + 1, message };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let step = value["step"].as_f64().ok_or_else(|| bad("no numeric `step`".into()))?;
        if let Some(loss) = value["eval_loss"].as_f64() {
            curves.eval_loss.push((step, loss));
        } else {
            let loss = value["loss"].as_f64().ok_or_else(|| bad("neither `loss` nor `eval_loss`".into()))?;
            curves.train_loss.push((step, loss));
            if let Some(lr) = value["learning_rate"].as_f64() {
                curves.learning_rate.push((step, lr));
            }
            curves.peak_memory_bytes = curves.peak_memory_bytes.max(value["peak_memory_bytes"].as_u64());
        }
    }
    if curves.train_loss.is_empty() {
        return Err(PlotError::Empty(path.into()));
    }
    Ok(curves)
}

/// Draws the loss chart above the learning-rate chart into a `width` × `height` PNG.
pub fn plot(curves: &Curves, title: &str, out: &Path, (width, height): (u32, u32)) -> Result<(), PlotError> {
    let draw_error = |e: &dyn std::fmt::Display| PlotError::Draw { path: out.into(), message: e.to_string() };
    // Registering twice (two plots in one process) keeps the first registration; both are this font.
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);

    let root = BitMapBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|e| draw_error(&e))?;
    let (top, bottom) = root.split_vertically(height * 62 / 100);

    let last_step = curves.train_loss.iter().chain(&curves.eval_loss).map(|p| p.0).fold(1.0, f64::max);
    let losses = curves.train_loss.iter().chain(&curves.eval_loss).map(|p| p.1).filter(|v| v.is_finite());
    let (low, high) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((high - low) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..last_step, (low - pad)..(high + pad))
        .map_err(|e| draw_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| draw_error(&e))?;
    chart
        .draw_series(LineSeries::new(curves.train_loss.iter().copied(), BLUE.stroke_width(2)))
        .map_err(|e| draw_error(&e))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !curves.eval_loss.is_empty() {
        chart
            .draw_series(LineSeries::new(curves.eval_loss.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| draw_error(&e))?
            .label("eval loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(curves.eval_loss.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| draw_error(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| draw_error(&e))?;

    let peak_lr = curves.learning_rate.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-12);
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..last_step, 0.0..peak_lr * 1.05)
        .map_err(|e| draw_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("learning rate")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| draw_error(&e))?;
    chart
        .draw_series(LineSeries::new(curves.learning_rate.iter().copied(), RGBColor(0, 140, 60).stroke_width(2)))
        .map_err(|e| draw_error(&e))?;
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}
