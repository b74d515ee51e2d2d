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

/// The tensors of a Llama-shaped model of about `bytes`, in file order.
fn tensors(bytes: u64, dtype: SynthDtype) -> Vec<(String, Dtype, Vec<usize>)> {
    // Llama-7B shapes for large sizes, TinyLlama's for medium ones, and toys for tests (the
    // smallest about 1.4 MB).
    let (hidden, inter, vocab) = match bytes {
        b if b >= 8 << 30 => (4096, 11008, 32000),
        b if b >= 512 << 20 => (2048, 5632, 32000),
        b if b >= 16 << 20 => (512, 1408, 8000),
        _ => (128, 352, 2000),
    };
    let size = |d: Dtype, s: &[usize]| s.iter().product::<usize>() as u64 * d.bitsize() as u64 / 8;
    let w = dtype.weight();
    let layer: Vec<(&str, Dtype, Vec<usize>)> = vec![
        ("input_layernorm.weight", dtype.norm(), vec![hidden]),
        ("self_attn.q_proj.weight", w, vec![hidden, hidden]),
        ("self_attn.k_proj.weight", w, vec![hidden, hidden]),
        ("self_attn.v_proj.weight", w, vec![hidden, hidden]),
        ("self_attn.o_proj.weight", w, vec![hidden, hidden]),
        ("post_attention_layernorm.weight", dtype.norm(), vec![hidden]),
        ("mlp.gate_proj.weight", w, vec![inter, hidden]),
        ("mlp.up_proj.weight", w, vec![inter, hidden]),
        ("mlp.down_proj.weight", w, vec![hidden, inter]),
    ];
    let per_layer: u64 = layer.iter().map(|(_, d, s)| size(*d, s)).sum();
    let edges = 2 * size(dtype.embed(), &[vocab, hidden]) + size(dtype.norm(), &[hidden]);
    let layers = (bytes.saturating_sub(edges) / per_layer).max(1);
    let mut out = vec![("model.embed_tokens.weight".to_owned(), dtype.embed(), vec![vocab, hidden])];
    for i in 0..layers {
        out.extend(layer.iter().map(|(n, d, s)| (format!("model.layers.{i}.{n}"), *d, s.clone())));
    }
    out.push(("model.norm.weight".into(), dtype.norm(), vec![hidden]));
    out.push(("lm_head.weight".into(), dtype.embed(), vec![vocab, hidden]));
    out
}

/// The folder of a synthetic checkpoint of `bytes` in `shards` shards, generating it first
/// if the cache does not hold a complete one.
pub fn ensure(cache: &Path, bytes: u64, shards: usize, dtype: SynthDtype) -> anyhow::Result<PathBuf> {
    let dir = cache.join(format!("llama-{}MiB-{shards}shards-{}", bytes >> 20, dtype.name()));
    let marker = dir.join(".complete");
    if marker.exists() {
        return Ok(dir);
    }
    // The model's smallest shape is larger than a few bytes: a smaller size is not what was
    // asked for, and is said rather than made.
    let smallest: u64 = tensors(1, dtype).iter().map(nbytes).sum();
    if bytes < smallest {
        bail!("--synthetic {bytes}: the smallest synthetic checkpoint is {smallest} bytes");
    }
    // Checked before the tensors are listed: their list grows with the size asked for.
    let free = tensorlift_io::cache::free_space(cache.parent().unwrap_or(cache)).unwrap_or(u64::MAX);
    if bytes > free {
        bail!("{}: needs {bytes} bytes for the synthetic checkpoint, {free} free", cache.display());
    }
    let all = tensors(bytes, dtype);
    let total: u64 = all.iter().map(nbytes).sum();
    if total > free {
        bail!("{}: needs {} bytes for the synthetic checkpoint, {} free", cache.display(), total, free);
    }
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
    t.2.iter().product::<usize>() as u64 * t.1.bitsize() as u64 / 8
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

    /// A checkpoint is the size asked for, to within a layer, down to the smallest one; a
    /// smaller size is refused before anything is made.
    #[test]
    fn checkpoints_are_the_size_asked_for() {
        for bytes in [2u64 << 20, 8 << 20, 24 << 20, 600 << 20] {
            let total: u64 = tensors(bytes, SynthDtype::Bf16).iter().map(nbytes).sum();
            assert!(total <= bytes && total + (bytes / 8).max(1 << 20) > bytes, "{total} for {bytes}");
        }
        let dir = tempfile::tempdir().unwrap();
        let err = ensure(dir.path(), 4096, 1, SynthDtype::Bf16).unwrap_err().to_string();
        assert!(err.contains("the smallest synthetic checkpoint is"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "made something");
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
