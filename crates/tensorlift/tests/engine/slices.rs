//! Slices at load, and the tensor-parallel helper, against an independent reading.

use std::collections::BTreeMap;
use std::ops::Range;

use tensorlift::{Dtype, LoadError, Sharding, Split, TensorSlice};
use tensorlift_testkit::slice_bytes;

use crate::support::{base, loaders_with, scratch, write_shard, Spec};

const SLICED: &[Spec<'static>] = &[
    ("before", Dtype::U8, &[3]),
    ("m", Dtype::F32, &[37, 53]),
    ("t3", Dtype::BF16, &[5, 6, 7]),
    ("rows", Dtype::U8, &[1000, 3]),
    ("whole", Dtype::F16, &[64, 65]),
    ("empty_cols", Dtype::F32, &[4, 8]),
    ("last", Dtype::I64, &[9, 2]),
];

fn slices() -> Vec<(&'static str, Vec<Range<usize>>)> {
    vec![
        ("m", vec![3..20, 5..40]),
        ("t3", vec![1..4, 0..6, 2..5]),
        #[allow(clippy::single_range_in_vec_init)] // One range: a slice of the first dimension.
        ("rows", vec![100..900]),
        ("empty_cols", vec![0..4, 3..3]),
        ("last", vec![8..9, 1..2]),
    ]
}

#[test]
fn slices_match_an_independent_reading_on_every_backend() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    let full = write_shard(&path, SLICED);
    let spec: BTreeMap<&str, (Dtype, &[usize])> = SLICED.iter().map(|&(n, d, s)| (n, (d, s))).collect();
    let mut want = full.clone();
    let mut shapes: BTreeMap<String, Vec<usize>> = spec.iter().map(|(n, (_, s))| (n.to_string(), s.to_vec())).collect();
    for (name, ranges) in slices() {
        let (dtype, shape) = spec[name];
        want.insert(name.into(), slice_bytes(&full[name], shape, dtype.bitsize() / 8, &ranges));
        let mut sliced = shape.to_vec();
        for (d, r) in ranges.iter().enumerate() {
            sliced[d] = r.end - r.start;
        }
        shapes.insert(name.into(), sliced);
    }
    for chunk in [4096, 1 << 20] {
        let with_slices = |mut b: tensorlift::LoaderBuilder| {
            for (name, ranges) in slices() {
                b = b.slice(name, TensorSlice::new(ranges));
            }
            b
        };
        for (what, loader) in loaders_with(chunk, with_slices) {
            let model = loader.load_blocking(&path).unwrap();
            crate::support::assert_identical(&model, &want, &what);
            for (name, shape) in &shapes {
                assert_eq!(model.get(name).unwrap().shape(), shape.as_slice(), "{what}: {name}");
            }
            let stats = model.stats();
            let whole: u64 = full.values().map(|v| v.len() as u64).sum();
            assert_eq!(stats.checkpoint_bytes, whole);
            assert_eq!(stats.bytes, want.values().map(|v| v.len() as u64).sum::<u64>());
        }
    }
}

/// Tensors named as a Llama checkpoint names them, small.
const LLAMA: &[Spec<'static>] = &[
    ("model.embed_tokens.weight", Dtype::BF16, &[128, 32]),
    ("model.layers.0.input_layernorm.weight", Dtype::BF16, &[32]),
    ("model.layers.0.self_attn.q_proj.weight", Dtype::BF16, &[32, 32]),
    ("model.layers.0.self_attn.k_proj.weight", Dtype::BF16, &[16, 32]),
    ("model.layers.0.self_attn.v_proj.weight", Dtype::BF16, &[16, 32]),
    ("model.layers.0.self_attn.o_proj.weight", Dtype::BF16, &[32, 32]),
    ("model.layers.0.mlp.gate_proj.weight", Dtype::BF16, &[96, 32]),
    ("model.layers.0.mlp.up_proj.weight", Dtype::BF16, &[96, 32]),
    ("model.layers.0.mlp.down_proj.weight", Dtype::BF16, &[32, 96]),
    ("model.layers.0.mlp.down_proj.bias", Dtype::BF16, &[32]),
    ("model.norm.weight", Dtype::BF16, &[32]),
    ("lm_head.weight", Dtype::BF16, &[128, 32]),
];

#[test]
fn each_rank_gets_its_share_and_the_shares_make_the_whole() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    let full = write_shard(&path, LLAMA);
    let world = 4;
    let mut joined: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for rank in 0..world {
        // 16 key/value rows: 4 heads of 4.
        let sharding = Sharding::llama(rank, world, 4).unwrap();
        let model = base().shard(sharding.clone()).chunk_size(4096).build().unwrap().load_blocking(&path).unwrap();
        for &(name, dtype, shape) in LLAMA {
            let t = model.get(name).unwrap();
            let dim = match sharding.split_of(name) {
                // 128 rows pad to 128: the vocabulary split is the even one here.
                Split::Column | Split::Vocab => Some(0),
                Split::Row if shape.len() > 1 => Some(shape.len() - 1),
                _ => None,
            };
            let want = match dim {
                None => full[name].clone(),
                Some(d) => {
                    let share = shape[d] / world;
                    let mut ranges: Vec<Range<usize>> = shape[..d].iter().map(|&n| 0..n).collect();
                    ranges.push(rank * share..(rank + 1) * share);
                    assert_eq!(t.shape()[d], share, "{name} rank {rank}");
                    slice_bytes(&full[name], shape, dtype.bitsize() / 8, &ranges)
                }
            };
            assert!(t.bytes().unwrap() == want.as_slice(), "{name} rank {rank}");
            joined.entry(name.into()).or_default().push(want);
        }
        // Column shares are read alone; row shares read the rows that cover them.
        let stats = model.stats();
        assert!(stats.bytes_read < stats.checkpoint_bytes, "{stats:?}");
    }
    // The row-parallel shares, interleaved row by row, are the whole tensor again.
    let o = &joined["model.layers.0.self_attn.o_proj.weight"];
    let row = 32 / world * 2;
    let mut whole = Vec::new();
    for r in 0..32 {
        for share in o {
            whole.extend_from_slice(&share[r * row..(r + 1) * row]);
        }
    }
    assert!(whole == full["model.layers.0.self_attn.o_proj.weight"]);
    // Column shares, one after another, are the whole tensor.
    assert!(joined["lm_head.weight"].concat() == full["lm_head.weight"]);
}

#[test]
fn a_first_dimension_share_reads_only_its_rows() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    write_shard(&path, &[("big", Dtype::F32, &[4096, 256])]);
    let sharding = Sharding::new(1, 4).unwrap().rule("big", Split::Column).unwrap();
    let model = base().shard(sharding).build().unwrap().load_blocking(&path).unwrap();
    let stats = model.stats();
    assert_eq!(stats.checkpoint_bytes, 4 << 20);
    assert_eq!(stats.bytes, 1 << 20);
    // The quarter, and at most a page either side for alignment.
    assert!(stats.bytes_read <= (1 << 20) + 8192, "{}", stats.bytes_read);
}

#[test]
fn slices_and_conversion_combine() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    let full = write_shard(&path, &[("m", Dtype::F32, &[6, 10])]);
    let model = base()
        .slice("m", TensorSlice::new([1..5, 2..9]))
        .convert_to(Dtype::BF16)
        .build()
        .unwrap()
        .load_blocking(&path)
        .unwrap();
    let t = model.get("m").unwrap();
    assert_eq!((t.dtype(), t.shape()), (Dtype::BF16, &[4usize, 7][..]));
    let src = slice_bytes(&full["m"], &[6, 10], 4, &[1..5, 2..9]);
    let want: Vec<u8> = src
        .chunks(4)
        .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
        .collect();
    assert!(t.bytes().unwrap() == want.as_slice());
}

#[test]
fn bad_slices_are_refused_before_reading_naming_the_tensor() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    write_shard(&path, &[("m", Dtype::F32, &[6, 10]), ("v", Dtype::F32, &[7]), ("s", Dtype::F32, &[])]);
    let err = |b: tensorlift::LoaderBuilder| b.build().unwrap().load_blocking(&path).unwrap_err();
    let cases = [
        (base().slice("m", TensorSlice::rows(0..7)), "m", "range 0..7 of dimension 0 is outside 0..6"),
        (base().slice("m", TensorSlice::new([0..1, 0..1, 0..1])), "m", "3 ranges for a tensor of 2 dimensions"),
        (base().slice("nope", TensorSlice::rows(0..1)), "nope", "no such tensor"),
        (base().shard(Sharding::new(0, 2).unwrap().rule("v", Split::Column).unwrap()), "v", "divide evenly"),
        (base().shard(Sharding::new(0, 2).unwrap().rule("m", Split::Dim(2)).unwrap()), "m", "dimension 2"),
        // A scalar is whole on every rank, but a rule that names a dimension of it is wrong.
        (base().shard(Sharding::new(0, 2).unwrap().rule("s", Split::Dim(0)).unwrap()), "s", "no dimension 0"),
        (base().slice_with(|n: &str, _: &[usize]| Err(format!("no {n} today"))), "m", "no m today"),
    ];
    for (b, tensor, says) in cases {
        match err(b) {
            LoadError::Slice { tensor: t, message, .. } => {
                assert_eq!(t, tensor);
                assert!(message.contains(says), "{message}");
            }
            e => panic!("{tensor}: {e}"),
        }
    }
    assert!(Sharding::new(2, 2).is_err());
    assert!(Sharding::new(0, 0).is_err());
    assert!(Sharding::new(0, 2).unwrap().rule("[", Split::Row).is_err());
}

#[test]
fn vocabulary_shares_are_padded_as_vllm_pads_them() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    // 100 rows pad to 128: 32 per rank, and the last rank keeps the 4 that exist.
    let full = write_shard(&path, &[("lm_head.weight", Dtype::F32, &[100, 4])]);
    for (rank, rows) in [(0, 0..32), (2, 64..96), (3, 96..100)] {
        let model = base().shard(Sharding::llama(rank, 4, 4).unwrap()).build().unwrap().load_blocking(&path).unwrap();
        let t = model.get("lm_head.weight").unwrap();
        assert_eq!(t.shape(), &[rows.len(), 4], "rank {rank}");
        assert!(t.bytes().unwrap() == &full["lm_head.weight"][rows.start * 16..rows.end * 16], "rank {rank}");
    }
    // Fewer key/value heads than ranks, or a number they do not divide: refused.
    assert!(Sharding::llama(0, 8, 4).is_err());
    assert!(Sharding::llama(0, 4, 6).is_err());
    // Quantized and adapter tensors are not split by the Llama rules.
    let s = Sharding::llama(0, 4, 4).unwrap();
    for name in ["model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.lora_A.weight"] {
        assert_eq!(s.split_of(name), Split::Replicated, "{name}");
    }
    assert_eq!(s.split_of("model.layers.0.self_attn.o_proj.bias"), Split::Replicated);
    // A header may state an empty tensor of any number of rows: one past what can be padded
    // is refused, not an overflow.
    use tensorlift::SliceRule;
    let err = s.slice("lm_head.weight", &[usize::MAX - 3, 0]).unwrap_err();
    assert!(err.contains("vocabulary"), "{err}");
}
