//! The benchmark's figures, and how they are printed, saved as JSON and drawn as SVG.

use std::fmt::Write;

use serde::Serialize;

use crate::Settings;

/// One measured workload, through `broker` and through the native client.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    pub(crate) driver: String,
    pub(crate) workload: String,
    pub(crate) unit: &'static str,
    pub(crate) broker: f64,
    pub(crate) native: f64,
    /// Whether the figure meets its target.
    pub(crate) on_target: bool,
    /// The target, in words.
    pub(crate) target: &'static str,
}

impl Figure {
    /// Messages per second; the target is at least 0.9 of the native client's.
    pub(crate) fn throughput(driver: &str, workload: &str, broker: f64, native: f64) -> Self {
        Figure {
            driver: driver.to_owned(),
            workload: workload.to_owned(),
            unit: "msg/s",
            broker,
            native,
            on_target: broker >= 0.9 * native,
            target: ">= 0.9x native",
        }
    }

    /// A latency percentile in microseconds; the target is within 100 µs of the native
    /// client's.
    pub(crate) fn latency(driver: &str, workload: &str, broker: f64, native: f64) -> Self {
        Figure {
            driver: driver.to_owned(),
            workload: workload.to_owned(),
            unit: "µs",
            broker,
            native,
            on_target: broker <= native + 100.0,
            target: "<= native + 100 µs",
        }
    }

    fn ratio(&self) -> f64 {
        if self.native > 0.0 {
            self.broker / self.native
        } else {
            0.0
        }
    }
}

/// Every figure of one run, with what it ran on.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    messages: usize,
    body_bytes: usize,
    latency_rate: u32,
    machine: String,
    peak_resident_kib: Option<u64>,
    figures: Vec<Figure>,
    soaks: Vec<Soak>,
}

/// Resident memory sampled during a sustained run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Soak {
    pub(crate) driver: String,
    pub(crate) messages: usize,
    /// (seconds since the start, resident KiB).
    pub(crate) samples: Vec<(u64, u64)>,
}

impl Soak {
    /// Flat: the last sample is no more than 10% (plus 4 MiB of allocator slack) above the
    /// highest sample of the run's first half. A bounded buffer may fill and drain on the way;
    /// memory that grows with the number of messages ends the run at its highest.
    pub(crate) fn is_flat(&self) -> bool {
        let half = self.samples.len().div_ceil(2);
        let early = self.samples[..half]
            .iter()
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0);
        let last = self.samples.last().map_or(0, |(_, kib)| *kib);
        last <= early + early / 10 + 4 * 1024
    }
}

impl Report {
    pub(crate) fn new(settings: &Settings) -> Self {
        Report {
            messages: settings.messages,
            body_bytes: crate::BODY.len(),
            latency_rate: settings.latency_rate,
            machine: machine(),
            peak_resident_kib: None,
            figures: Vec::new(),
            soaks: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    pub(crate) fn add_soak(&mut self, soak: Soak) {
        self.soaks.push(soak);
    }

    /// Records the process's peak resident memory so far.
    pub(crate) fn peak_memory(&mut self) {
        self.peak_resident_kib = peak_resident_kib();
    }

    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{} messages of {} bytes; latency at {} msg/s; {}",
            self.messages, self.body_bytes, self.latency_rate, self.machine
        );
        let _ = writeln!(
            out,
            "| driver | workload | broker | native | ratio | target |\n|---|---|---:|---:|---:|---|"
        );
        for figure in &self.figures {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} {} | {:.0} {} | {:.2} | {} {} |",
                figure.driver,
                figure.workload,
                figure.broker,
                figure.unit,
                figure.native,
                figure.unit,
                figure.ratio(),
                if figure.on_target { "met" } else { "MISSED" },
                figure.target,
            );
        }
        for soak in &self.soaks {
            let samples: Vec<String> = soak
                .samples
                .iter()
                .map(|(second, kib)| format!("{second}s {} MiB", kib / 1024))
                .collect();
            let _ = writeln!(
                out,
                "\n{} sustained run, {} messages: resident memory {} ({})",
                soak.driver,
                soak.messages,
                samples.join(", "),
                if soak.is_flat() { "flat" } else { "GROWING" }
            );
        }
        if let Some(kib) = self.peak_resident_kib {
            let _ = writeln!(
                out,
                "\npeak resident memory of the whole run: {} MiB",
                kib / 1024
            );
        }
        out
    }

    pub(crate) fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A bar chart of `broker / native` for every figure, with the 0.9 line drawn in.
    pub(crate) fn svg(&self) -> String {
        const ROW: usize = 28;
        const LABEL: usize = 300;
        const WIDTH: usize = 760;
        let scale = (WIDTH - LABEL - 60) as f64 / 1.5;
        let height = 60 + ROW * self.figures.len();

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="13">"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="10" y="20" font-weight="bold">broker / native client (1.0 = same; throughput: higher is better, latency: lower is better)</text>"#
        );
        for (index, figure) in self.figures.iter().enumerate() {
            let y = 40 + index * ROW;
            let ratio = figure.ratio().min(1.5);
            let colour = if figure.on_target {
                "#3a7d44"
            } else {
                "#c0392b"
            };
            let _ = writeln!(
                svg,
                r#"<text x="10" y="{}">{} {}</text><rect x="{LABEL}" y="{y}" width="{:.1}" height="{}" fill="{colour}"/><text x="{:.1}" y="{}">{:.2}</text>"#,
                y + 15,
                figure.driver,
                escape(&figure.workload),
                ratio * scale,
                ROW - 8,
                LABEL as f64 + ratio * scale + 6.0,
                y + 15,
                figure.ratio(),
            );
        }
        for (value, dash) in [(0.9, "4 3"), (1.0, "")] {
            let x = LABEL as f64 + value * scale;
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="32" x2="{x:.1}" y2="{}" stroke="#333" stroke-dasharray="{dash}"/><text x="{:.1}" y="{}">{value}</text>"##,
                height - 14,
                x - 8.0,
                height - 2,
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;")
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cores} cores, {cpu}")
}

fn peak_resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
