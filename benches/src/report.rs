//! Tables and JSON of what was measured.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::json;
use tensorlift::Loader;

use crate::engines::{Checkpoint, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Warm,
    /// Warm, after a pause in which a virtual machine's host may take idle memory back
    /// (free-page reporting): the first touch of memory then costs a fault in the host too.
    WarmIdle,
    Cold,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Warm => "warm",
            Mode::WarmIdle => "warm-idle",
            Mode::Cold => "cold",
        }
    }
}

struct Measured {
    kind: Kind,
    bytes: u64,
    secs: Vec<f64>,
}

impl Measured {
    fn median(&self) -> f64 {
        let mut v = self.secs.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.median() / 1e9
    }
    /// The fastest and slowest runs' seconds, for a table's spread column ("" for one run).
    fn spread(&self) -> String {
        let min = self.secs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.secs.iter().copied().fold(0.0, f64::max);
        if self.secs.len() < 2 {
            String::new()
        } else {
            format!("{min:.3}-{max:.3}")
        }
    }
}

pub struct Report {
    checkpoint: serde_json::Value,
    machine: serde_json::Value,
    backends: serde_json::Value,
    runs: usize,
    // Insertion order of names, per mode.
    modes: BTreeMap<Mode, Vec<(&'static str, Measured)>>,
    skipped: Vec<(String, String)>,
    notes: Vec<String>,
    /// tensorlift's runs whose tensors were checked against the files, of those made.
    pub byte_checked: (usize, usize),
    /// tensorlift's bytes land on several devices (`--devices`, `--group`): its figure is
    /// their sum, which no limit here (one device's copies, one reading of the files) bounds.
    pub several_devices: bool,
}

impl Report {
    pub fn new(c: &Checkpoint, loader: &Loader, runs: usize, settings: serde_json::Value) -> Report {
        let io = loader.io_report();
        Report {
            checkpoint: json!({"path": c.dir.display().to_string(), "shards": c.shards.len(), "tensors": c.tensors, "bytes": c.bytes, "file_bytes": c.file_bytes}),
            machine: machine(),
            backends: json!({"device": loader.device().to_string(), "io": io.backend.to_string(), "io_reason": io.reason,
                             "io_uring": io.uring.to_string(), "settings": settings}),
            runs,
            modes: BTreeMap::new(),
            skipped: Vec::new(),
            notes: Vec::new(),
            byte_checked: (0, 0),
            several_devices: false,
        }
    }

    pub fn skip(&mut self, name: &str, why: &str) {
        self.skipped.push((name.to_owned(), why.to_owned()));
    }

    pub fn note(&mut self, text: &str) {
        self.notes.push(text.to_owned());
    }

    pub fn record(&mut self, mode: Mode, name: &'static str, kind: Kind, bytes: u64, secs: f64) {
        let list = self.modes.entry(mode).or_default();
        match list.iter_mut().find(|(n, _)| *n == name) {
            Some((_, m)) => m.secs.push(secs),
            None => list.push((name, Measured { kind, bytes, secs: vec![secs] })),
        }
    }

    fn tensorlift(list: &[(&'static str, Measured)]) -> Option<f64> {
        list.iter().find(|(n, _)| *n == "tensorlift").map(|(_, m)| m.gbps())
    }

    /// tensorlift's rate as a fraction of a limit's, where the two compare.
    fn fraction(&self, tl: Option<f64>, limit: &Measured) -> Option<f64> {
        tl.filter(|_| !self.several_devices).map(|t| t / limit.gbps())
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let c = &self.checkpoint;
        let _ = writeln!(
            s,
            "checkpoint: {} ({} shards, {} tensors, {:.3} GB)",
            c["path"].as_str().unwrap_or(""),
            c["shards"],
            c["tensors"],
            c["bytes"].as_f64().unwrap_or(0.0) / 1e9
        );
        let _ = writeln!(s, "machine: {}", self.machine["summary"].as_str().unwrap_or(""));
        let _ = writeln!(
            s,
            "tensorlift: device {}, io {} ({})",
            self.backends["device"].as_str().unwrap_or(""),
            self.backends["io"].as_str().unwrap_or(""),
            self.backends["io_reason"].as_str().unwrap_or("")
        );
        for (mode, list) in &self.modes {
            let tl = Self::tensorlift(list).unwrap_or(f64::NAN);
            let runs = if self.runs == 1 { "1 run".to_owned() } else { format!("median of {} runs", self.runs) };
            let _ = writeln!(s, "\n{} cache, {runs}", mode.name());
            let _ =
                writeln!(s, "  {:<20} {:>9} {:>10} {:>14}   tensorlift is", "engine", "seconds", "GB/s", "runs (s)");
            for (name, m) in list.iter().filter(|(_, m)| m.kind == Kind::Engine) {
                let vs = if *name == "tensorlift" { "-".to_owned() } else { ratio(tl / m.gbps()) };
                let _ = writeln!(s, "  {:<20} {:>9.3} {:>10.2} {:>14}   {vs}", name, m.median(), m.gbps(), m.spread());
            }
            let _ = writeln!(
                s,
                "  {:<20} {:>9} {:>10} {:>14} {:>14}",
                "limit", "seconds", "GB/s", "runs (s)", "tensorlift at"
            );
            for (name, m) in list.iter().filter(|(_, m)| m.kind == Kind::Limit) {
                let at = self.fraction(Some(tl), m).map_or_else(|| "-".to_owned(), |f| format!("{:.0}%", 100.0 * f));
                let _ =
                    writeln!(s, "  {:<20} {:>9.3} {:>10.2} {:>14} {:>14}", name, m.median(), m.gbps(), m.spread(), at);
            }
        }
        // (Notes and reasons may quote a checkpoint's names or a file's path: escaped.)
        let printable = tensorlift::terminal::printable;
        for n in &self.notes {
            let _ = writeln!(s, "\nnote: {}", printable(n));
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s);
            // Entries skipped for the same reason share one line.
            let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
            for (n, why) in &self.skipped {
                match reasons.iter_mut().find(|(w, _)| *w == why.as_str()) {
                    Some((_, names)) => names.push(n),
                    None => reasons.push((why, vec![n])),
                }
            }
            for (why, names) in reasons {
                let _ = writeln!(s, "skipped {}: {}", names.join(", "), printable(why));
            }
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut modes = serde_json::Map::new();
        for (mode, list) in &self.modes {
            let tl = Self::tensorlift(list);
            let entry = |m: &Measured| json!({"median_seconds": m.median(), "gbps": m.gbps(), "bytes": m.bytes, "runs_seconds": m.secs});
            let engines: serde_json::Map<_, _> = list
                .iter()
                .filter(|(_, m)| m.kind == Kind::Engine)
                .map(|(n, m)| {
                    let mut e = entry(m);
                    e["ratio_to_tensorlift"] = json!(tl.map(|t| m.gbps() / t));
                    ((*n).to_owned(), e)
                })
                .collect();
            let limits: serde_json::Map<_, _> = list
                .iter()
                .filter(|(_, m)| m.kind == Kind::Limit)
                .map(|(n, m)| {
                    let mut e = entry(m);
                    e["tensorlift_fraction"] = json!(self.fraction(tl, m));
                    ((*n).to_owned(), e)
                })
                .collect();
            modes.insert(mode.name().into(), json!({"engines": engines, "limits": limits}));
        }
        let skipped: serde_json::Map<_, _> = self.skipped.iter().map(|(n, w)| (n.clone(), json!(w))).collect();
        json!({
            "checkpoint": self.checkpoint,
            "machine": self.machine,
            "backends": self.backends,
            "runs": self.runs,
            "modes": modes,
            "skipped": skipped,
            "notes": self.notes,
            "byte_checked": {"runs": self.byte_checked.0, "of": self.byte_checked.1},
        })
    }
}

pub fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_owned();
    let mem = crate::synthetic::mem_total().unwrap_or(0);
    let kernel = tensorlift_io::kernel_release().unwrap_or_default();
    json!({
        "cpus": cpus,
        "cpu_model": model,
        "memory_bytes": mem,
        "kernel": kernel,
        "summary": format!("{cpus} CPUs ({model}), {:.0} GiB, Linux {kernel}", mem as f64 / (1u64 << 30) as f64),
    })
}

/// "2.31x faster" or "1.25x slower": how tensorlift compares with an engine, from the ratio
/// of tensorlift's speed to the engine's.
pub fn ratio(r: f64) -> String {
    if !r.is_finite() || r <= 0.0 {
        "-".to_owned()
    } else if r >= 1.0 {
        format!("{r:.2}x faster")
    } else {
        format!("{:.2}x slower", 1.0 / r)
    }
}
