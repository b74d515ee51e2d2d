//! A Llama-like sharded checkpoint, generated once into a cache folder and reused.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tensorlift::Dtype;
use tensorlift_format::encode_header;

/// Element types of the generated checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthDtype {
    Bf16,
    F16,
    F32,
    /// BF16 projections, F16 embeddings, F32 norms.
    Mixed,
}

impl SynthDtype {
    fn name(self) -> &'static str {
        match self {
            SynthDtype::Bf16 => "bf16",
            SynthDtype::F16 => "f16",
            SynthDtype::F32 => "f32",
            SynthDtype::Mixed => "mixed",
        }
    }
    fn weight(self) -> Dtype {
        match self {
            SynthDtype::Bf16 | SynthDtype::Mixed => Dtype::BF16,
            SynthDtype::F16 => Dtype::F16,
            SynthDtype::F32 => Dtype::F32,
        }
    }
    fn embed(self) -> Dtype {
        match self {
            SynthDtype::Mixed => Dtype::F16,
            d => d.weight(),
        }
    }
    fn norm(self) -> Dtype {
        match self {
            SynthDtype::Mixed => Dtype::F32,
            d => d.weight(),
        }
    }
}

/// A Llama-shaped model: its widths, and how many layers of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    hidden: usize,
    inter: usize,
    vocab: usize,
    layers: u64,
}

/// Llama-7B's widths, TinyLlama's, and two toys for tests, from the widest: the widest whose
/// threshold `bytes` reaches and whose one layer (with the embeddings) fits in `bytes`.
const WIDTHS: [(u64, (usize, usize, usize)); 4] =
    [(8 << 30, (4096, 11008, 32000)), (512 << 20, (2048, 5632, 32000)), (0, (512, 1408, 8000)), (0, (128, 352, 2000))];

impl Shape {
    /// The model of at most `bytes` (as close as whole layers come), or of one layer of the
    /// smallest widths where `bytes` is less than that.
    fn of(bytes: u64, dtype: SynthDtype) -> Shape {
        let mut shape = Shape { hidden: 0, inter: 0, vocab: 0, layers: 1 };
        for &(threshold, (hidden, inter, vocab)) in &WIDTHS {
            shape = Shape { hidden, inter, vocab, layers: 1 };
            if bytes >= threshold && shape.total(dtype) <= bytes {
                break;
            }
        }
        let per_layer = shape.per_layer(dtype);
        shape.layers = (bytes.saturating_sub(shape.edges(dtype)) / per_layer).max(1);
        shape
    }

    /// Each layer's tensors: name, dtype, shape.
    fn layer(&self, dtype: SynthDtype) -> [(&'static str, Dtype, Vec<usize>); 9] {
        let (h, i, w, n) = (self.hidden, self.inter, dtype.weight(), dtype.norm());
        [
            ("input_layernorm.weight", n, vec![h]),
            ("self_attn.q_proj.weight", w, vec![h, h]),
            ("self_attn.k_proj.weight", w, vec![h, h]),
            ("self_attn.v_proj.weight", w, vec![h, h]),
            ("self_attn.o_proj.weight", w, vec![h, h]),
            ("post_attention_layernorm.weight", n, vec![h]),
            ("mlp.gate_proj.weight", w, vec![i, h]),
            ("mlp.up_proj.weight", w, vec![i, h]),
            ("mlp.down_proj.weight", w, vec![h, i]),
        ]
    }

    fn per_layer(&self, dtype: SynthDtype) -> u64 {
        self.layer(dtype).iter().map(|(_, d, s)| size(*d, s)).sum()
    }

    /// The embeddings, the final norm and the head.
    fn edges(&self, dtype: SynthDtype) -> u64 {
        2 * size(dtype.embed(), &[self.vocab, self.hidden]) + size(dtype.norm(), &[self.hidden])
    }

    /// The tensors' bytes, all told.
    fn total(&self, dtype: SynthDtype) -> u64 {
        self.edges(dtype) + self.layers * self.per_layer(dtype)
    }
}

fn size(d: Dtype, s: &[usize]) -> u64 {
    s.iter().product::<usize>() as u64 * d.bitsize() as u64 / 8
}

/// The tensors of a Llama-shaped model of about `bytes`, in file order.
fn tensors(bytes: u64, dtype: SynthDtype) -> Vec<(String, Dtype, Vec<usize>)> {
    let shape = Shape::of(bytes, dtype);
    let (hidden, vocab) = (shape.hidden, shape.vocab);
    let layer = shape.layer(dtype);
    let mut out = vec![("model.embed_tokens.weight".to_owned(), dtype.embed(), vec![vocab, hidden])];
    for i in 0..shape.layers {
        out.extend(layer.iter().map(|(n, d, s)| (format!("model.layers.{i}.{n}"), *d, s.clone())));
    }
    out.push(("model.norm.weight".into(), dtype.norm(), vec![hidden]));
    out.push(("lm_head.weight".into(), dtype.embed(), vec![vocab, hidden]));
    out
}

/// The folder of a synthetic checkpoint of `bytes` in `shards` shards, generating it first
/// if the cache does not hold a complete one of that size. (Named by MiB where `bytes` is
/// whole MiB, as before, else by bytes; a folder whose index says another size, made by an
/// older version or for a size in the same MiB, is made again.)
pub fn ensure(cache: &Path, bytes: u64, shards: usize, dtype: SynthDtype) -> anyhow::Result<PathBuf> {
    let size = match bytes % (1 << 20) {
        0 => format!("{}MiB", bytes >> 20),
        _ => format!("{bytes}B"),
    };
    let dir = cache.join(format!("llama-{size}-{shards}shards-{}", dtype.name()));
    let marker = dir.join(".complete");
    // The model's smallest shape is larger than a few bytes: a smaller size is not what was
    // asked for, and is said rather than made.
    let smallest = Shape::of(1, dtype).total(dtype);
    if bytes < smallest {
        bail!("--synthetic {bytes}: the smallest synthetic checkpoint is {smallest} bytes");
    }
    let total = Shape::of(bytes, dtype).total(dtype);
    if marker.exists() && indexed_total(&dir) == Some(total) {
        return Ok(dir);
    }
    let _ = std::fs::remove_file(&marker);
    // Checked before the tensors are listed: their list grows with the size asked for.
    let free = tensorlift_io::cache::free_space(cache.parent().unwrap_or(cache)).unwrap_or(u64::MAX);
    if total > free {
        bail!("{}: needs {total} bytes for the synthetic checkpoint, {free} free", cache.display());
    }
    let all = tensors(bytes, dtype);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("generating a {:.2} GB synthetic checkpoint in {} (once)", total as f64 / 1e9, dir.display());
    let groups = split(&all, shards.clamp(1, all.len()), total);
    let mut weight_map = BTreeMap::new();
    let mut seed = 0x243F_6A88_85A3_08D3u64;
    for (i, group) in groups.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
        let specs: Vec<_> = group.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
        let enc = encode_header(&specs, None).context("synthetic header overflows")?;
        let path = dir.join(&name);
        let mut f = BufWriter::with_capacity(
            8 << 20,
            File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        f.write_all(&enc.bytes)?;
        write_random(&mut f, enc.data_len(), &mut seed)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        eprintln!("  wrote {name} ({}/{})", i + 1, groups.len());
        for (n, _, _) in group {
            weight_map.insert(n.clone(), serde_json::Value::from(name.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)?;
    std::fs::write(&marker, b"")?;
    Ok(dir)
}

fn nbytes(t: &(String, Dtype, Vec<usize>)) -> u64 {
    size(t.1, &t.2)
}

/// The `total_size` the index of the synthetic checkpoint in `dir` records.
fn indexed_total(dir: &Path) -> Option<u64> {
    let text = std::fs::read(dir.join("model.safetensors.index.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&text).ok()?["metadata"]["total_size"].as_u64()
}

/// Cuts the tensors, in order, into exactly `shards` non-empty groups of about equal bytes:
/// each tensor goes to the shard its midpoint falls in, moved just enough that no shard is
/// skipped and enough tensors remain for the shards after it.
fn split(all: &[(String, Dtype, Vec<usize>)], shards: usize, total: u64) -> Vec<Vec<&(String, Dtype, Vec<usize>)>> {
    let mut groups: Vec<Vec<&(String, Dtype, Vec<usize>)>> = vec![Vec::new(); shards];
    let (n, mut acc, mut prev) = (all.len(), 0u64, 0usize);
    for (i, t) in all.iter().enumerate() {
        let want = ((acc + nbytes(t) / 2) as u128 * shards as u128 / total.max(1) as u128) as usize;
        let lo = prev.max((shards + i).saturating_sub(n));
        let hi = if i == 0 { 0 } else { (prev + 1).min(shards - 1) };
        prev = want.clamp(lo.min(hi), hi);
        groups[prev].push(t);
        acc += nbytes(t);
    }
    groups
}

/// Pseudo-random bytes (xorshift), fast enough that generation is disk-bound.
fn write_random(f: &mut impl Write, mut len: u64, seed: &mut u64) -> std::io::Result<()> {
    let mut block = vec![0u8; 1 << 20];
    while len > 0 {
        for word in block.chunks_exact_mut(8) {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            word.copy_from_slice(&seed.to_le_bytes());
        }
        let n = len.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// A size that suits the machine: an eighth of its memory, between 1 and 16 GiB, and at
/// most a quarter of the free space where the cache lives.
pub fn default_size(cache: &Path) -> u64 {
    let mem = mem_total().unwrap_or(8 << 30);
    let mut probe = cache.to_path_buf();
    while !probe.exists() && probe.pop() {}
    let disk = tensorlift_io::cache::free_space(&probe).unwrap_or(u64::MAX) / 4;
    (mem / 8).clamp(1 << 30, 16 << 30).min(disk).max(256 << 20) >> 20 << 20
}

/// The machine's memory in bytes, from /proc/meminfo.
pub fn mem_total() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Parses `1G`, `512M`, `2.5GiB`, `1073741824`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size (like 512M or 2G)"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("'{s}' must be a positive number of bytes"));
    }
    let bytes = v * mul as f64;
    // (u64::MAX as f64 is 2^64, past every u64: the cast below would saturate.)
    if bytes >= u64::MAX as f64 {
        return Err(format!("'{s}' is more bytes than a file can hold"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_gives_exactly_the_shards_asked_for_in_order() {
        for bytes in [1u64 << 20, 24 << 20, 600 << 20, 9 << 30] {
            let all = tensors(bytes, SynthDtype::Mixed);
            let total: u64 = all.iter().map(nbytes).sum();
            for shards in 1..=all.len().min(40) {
                let groups = split(&all, shards, total);
                assert_eq!(groups.len(), shards);
                assert!(groups.iter().all(|g| !g.is_empty()), "{bytes} {shards}");
                let flat: Vec<&str> = groups.iter().flatten().map(|t| t.0.as_str()).collect();
                let want: Vec<&str> = all.iter().map(|t| t.0.as_str()).collect();
                assert_eq!(flat, want);
            }
        }
    }

    /// A checkpoint is the size asked for, to within a layer, down to the smallest one (the
    /// widths are the widest of which one layer fits); a smaller size is refused before
    /// anything is made.
    #[test]
    fn checkpoints_are_the_size_asked_for() {
        for dtype in [SynthDtype::Bf16, SynthDtype::F32, SynthDtype::Mixed] {
            for bytes in [2u64 << 20, 8 << 20, 16 << 20, 20 << 20, 22 << 20, 24 << 20, 600 << 20, 9 << 30] {
                if bytes < Shape::of(1, dtype).total(dtype) {
                    continue; // (refused by `ensure`, below)
                }
                let (total, shape): (u64, _) =
                    (tensors(bytes, dtype).iter().map(nbytes).sum(), Shape::of(bytes, dtype));
                assert_eq!(total, shape.total(dtype));
                // Under the size, by less than a layer.
                assert!(total <= bytes && bytes - total < shape.per_layer(dtype), "{total} for {bytes}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let err = ensure(dir.path(), 4096, 1, SynthDtype::Bf16).unwrap_err().to_string();
        assert!(err.contains("the smallest synthetic checkpoint is"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "made something");
        // Two sizes in one MiB are two checkpoints; a folder of another size (an older
        // version's) is made again.
        let (a, b) = (2_300_000, 2_900_000);
        let (da, db) =
            (ensure(dir.path(), a, 1, SynthDtype::Bf16).unwrap(), ensure(dir.path(), b, 1, SynthDtype::Bf16).unwrap());
        assert_ne!(da, db);
        assert_eq!(
            (indexed_total(&da), indexed_total(&db)),
            (
                Some(Shape::of(a, SynthDtype::Bf16).total(SynthDtype::Bf16)),
                Some(Shape::of(b, SynthDtype::Bf16).total(SynthDtype::Bf16))
            )
        );
        let mib = ensure(dir.path(), 2 << 20, 1, SynthDtype::Bf16).unwrap();
        let index = mib.join("model.safetensors.index.json");
        std::fs::write(&index, r#"{"metadata": {"total_size": 22809600}, "weight_map": {}}"#).unwrap();
        let again = ensure(dir.path(), 2 << 20, 1, SynthDtype::Bf16).unwrap();
        assert_eq!(indexed_total(&again), Some(Shape::of(2 << 20, SynthDtype::Bf16).total(SynthDtype::Bf16)));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err() && parse_size("big").is_err() && parse_size("-1G").is_err());
        // Not a number of bytes a file can have: refused, not saturated to 16 EiB.
        for s in ["inf", "NaN", "1e30G", "16777216T"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }
}
