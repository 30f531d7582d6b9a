//! Figures and the results file.

use serde::Serialize;

/// One measured figure and its baseline from the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What was measured, e.g. `relay_drain`.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// Its unit, e.g. `msg/s`.
    pub unit: String,
    /// What it is compared with, e.g. `raw_pipelined_publish`.
    pub baseline: String,
    /// The baseline's value, in the same unit.
    pub baseline_value: f64,
    /// `value / baseline_value`.
    pub ratio: f64,
    /// The target ratio, if there is one, and which way it points.
    pub target: Option<String>,
}

impl Figure {
    /// A figure compared with a baseline.
    pub fn new(
        name: &str,
        value: f64,
        unit: &str,
        baseline: &str,
        baseline_value: f64,
        target: Option<&str>,
    ) -> Self {
        Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline: baseline.to_owned(),
            baseline_value,
            ratio: if baseline_value != 0.0 {
                value / baseline_value
            } else {
                f64::NAN
            },
            target: target.map(str::to_owned),
        }
    }

    /// `name value unit baseline ratio` on one line.
    pub fn line(&self) -> String {
        format!(
            "{} {:.1} {} {}={:.1} {:.2}{}",
            self.name,
            self.value,
            self.unit,
            self.baseline,
            self.baseline_value,
            self.ratio,
            self.target
                .as_deref()
                .map(|t| format!(" (target {t})"))
                .unwrap_or_default()
        )
    }
}

/// Every figure of a run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// The figures, in the order measured.
    pub figures: Vec<Figure>,
}

impl Report {
    /// Records and prints a figure.
    pub fn push(&mut self, figure: Figure) {
        println!("{}", figure.line());
        self.figures.push(figure);
    }

    /// Writes `target/bench/results.json` (relative to the workspace root).
    pub fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}
