//! `tensorlift inspect`: what a checkpoint holds, from its headers alone.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use tensorlift::LoadPlan;

use crate::text::printable;

pub fn run(path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let plan = tensorlift::plan(path)?;
    for warning in alignment_warnings(&plan) {
        eprintln!("warning: {}", crate::text::printable(&warning));
    }
    if json {
        crate::text::write_json(out, &PlanJson(&plan))?;
    } else {
        write_table(&plan, out)?;
    }
    Ok(())
}

/// Tensors whose absolute file offset is not a multiple of their element size: a
/// memory-mapped view of them would be misaligned, and loaders must copy them.
pub fn alignment_warnings(plan: &LoadPlan) -> Vec<String> {
    plan.tensors()
        .iter()
        .filter_map(|t| {
            let elem = (t.dtype.bitsize() / 8).max(1) as u64;
            (t.file_range.start % elem != 0).then(|| {
                format!(
                    "{}: tensor '{}' ({}) starts at file offset {}, not a multiple of its {elem}-byte element size",
                    plan.shards()[t.shard].path.display(),
                    t.name,
                    t.dtype,
                    t.file_range.start
                )
            })
        })
        .collect()
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// One tensor's cells, made when printed: a table of a million rows is never held.
fn cells<'a>(plan: &'a LoadPlan, t: &'a tensorlift::PlannedTensor) -> [std::borrow::Cow<'a, str>; 5] {
    [
        printable(&t.name),
        t.dtype.to_string().into(),
        shape_str(&t.shape).into(),
        t.len().to_string().into(),
        printable(&plan.shards()[t.shard].name),
    ]
}

fn write_table(plan: &LoadPlan, out: &mut dyn Write) -> std::io::Result<()> {
    let heads = ["NAME", "DTYPE", "SHAPE", "BYTES", "SHARD"];
    let mut widths = heads.map(str::len);
    for t in plan.tensors() {
        for (w, cell) in widths.iter_mut().zip(cells(plan, t)) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 5]| {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        )
    };
    line(out, heads)?;
    for t in plan.tensors() {
        let c = cells(plan, t);
        line(out, [&c[0], &c[1], &c[2], &c[3], &c[4]])?;
    }
    writeln!(
        out,
        "total: {} tensors, {} bytes in {} shard{}",
        plan.tensors().len(),
        plan.total_bytes(),
        plan.shards().len(),
        if plan.shards().len() == 1 { "" } else { "s" }
    )
}

/// The plan as JSON, written as it is serialized: no tree of the whole plan is built.
struct PlanJson<'a>(&'a LoadPlan);

impl serde::Serialize for PlanJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let plan = self.0;
        let files = plan.shards().iter().map(|s| {
            json!({
                "path": s.path.display().to_string(),
                "header_bytes": s.data_start(),
                "data_bytes": s.data_len,
                "metadata": s.metadata,
            })
        });
        let tensors = plan.tensors().iter().map(|t| {
            let shard = &plan.shards()[t.shard];
            let begin = t.file_range.start - shard.data_start();
            json!({
                "name": t.name,
                "file": shard.path.display().to_string(),
                "dtype": t.dtype.to_string(),
                "shape": t.shape,
                "data_offsets": [begin, begin + t.len()],
            })
        });
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("files", &Seq(std::cell::Cell::new(Some(files))))?;
        m.serialize_entry("tensors", &Seq(std::cell::Cell::new(Some(tensors))))?;
        m.serialize_entry("total_bytes", &plan.total_bytes())?;
        m.end()
    }
}

/// A sequence serialized from an iterator, once.
struct Seq<I>(std::cell::Cell<Option<I>>);

impl<I: Iterator<Item = serde_json::Value>> serde::Serialize for Seq<I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.take().into_iter().flatten())
    }
}
