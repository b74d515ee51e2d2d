//! `tensorlift inspect`: what a checkpoint holds, from its headers alone.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use tensorlift::LoadPlan;

pub fn run(path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let plan = tensorlift::plan(path)?;
    for warning in alignment_warnings(&plan) {
        eprintln!("warning: {warning}");
    }
    if json {
        serde_json::to_writer_pretty(&mut *out, &to_json(&plan))?;
        writeln!(out)?;
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

fn write_table(plan: &LoadPlan, out: &mut dyn Write) -> std::io::Result<()> {
    let rows: Vec<[String; 5]> = plan
        .tensors()
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.dtype.to_string(),
                shape_str(&t.shape),
                t.len().to_string(),
                plan.shards()[t.shard].name.clone(),
            ]
        })
        .collect();
    let heads = ["NAME", "DTYPE", "SHAPE", "BYTES", "SHARD"];
    let mut widths = heads.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
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
    for row in &rows {
        line(out, [&row[0], &row[1], &row[2], &row[3], &row[4]])?;
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

fn to_json(plan: &LoadPlan) -> serde_json::Value {
    let files: Vec<_> = plan
        .shards()
        .iter()
        .map(|s| {
            json!({
                "path": s.path.display().to_string(),
                "header_bytes": s.data_start(),
                "data_bytes": s.header.data_len(),
                "metadata": s.header.metadata,
            })
        })
        .collect();
    let tensors: Vec<_> = plan
        .tensors()
        .iter()
        .map(|t| {
            let shard = &plan.shards()[t.shard];
            let begin = t.file_range.start - shard.data_start();
            json!({
                "name": t.name,
                "file": shard.path.display().to_string(),
                "dtype": t.dtype.to_string(),
                "shape": t.shape,
                "data_offsets": [begin, begin + t.len()],
            })
        })
        .collect();
    json!({ "files": files, "tensors": tensors, "total_bytes": plan.total_bytes() })
}
