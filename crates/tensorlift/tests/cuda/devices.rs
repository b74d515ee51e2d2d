//! Loads onto several devices of one process (`LoaderBuilder::devices`): each device gets
//! exactly its part, each byte is read once, one staging budget serves all, and a fault on
//! one device ends the load on all with nothing left behind. The emulated driver has four
//! devices; on a real host with fewer, the tests that need more say so and skip.

use std::collections::BTreeMap;
use std::ops::Range;

use tensorlift::{Device, DevicePlan, Dtype, LoadError, Loader, Model, Sharding, Split};
use tensorlift_cuda::emulator::{self, Fault};
use tensorlift_testkit::{slice_bytes, write_sharded, Spec};

use super::{driver, quirky, scratch};

/// The devices a test can use (the first `n`), or `None` with why it skips.
fn devices(n: usize) -> Option<Vec<Device>> {
    let have = match tensorlift_cuda::cuda_status() {
        tensorlift_cuda::CudaStatus::Available(d) => d.devices.len(),
        tensorlift_cuda::CudaStatus::Unavailable(_) => 0,
    };
    if have < n {
        // (The emulated driver has four: a test of fewer may not skip there.)
        assert!(!emulator::is_emulated(), "the emulated driver has {have} devices, fewer than {n}");
        eprintln!("skipped: needs {n} CUDA devices, this host has {have}");
        return None;
    }
    Some((0..n).map(Device::Cuda).collect())
}

/// Every tensor of `model` on `device`, 256-byte aligned, with exactly the bytes `want` has,
/// and the model's bytes theirs.
fn assert_model(model: &Model, device: Device, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_tensors(model, device, want, what);
    assert_eq!(model.stats().bytes, want.values().map(|b| b.len() as u64).sum::<u64>(), "{what}: bytes");
}

/// Every tensor of `model` on `device`, 256-byte aligned, with exactly the bytes `want` has.
fn assert_tensors(model: &Model, device: Device, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(model.len(), want.len(), "{what}: tensor count");
    assert_eq!(model.stats().device, device, "{what}");
    for (name, bytes) in want {
        let t = model.get(name).unwrap_or_else(|| panic!("{what}: {name} missing"));
        assert_eq!(t.location(), device, "{what}: {name}");
        assert_eq!(t.device_ptr().unwrap() % 256, 0, "{what}: {name}");
        let got = t.to_host().unwrap();
        assert!(got.as_ref() == bytes.as_slice(), "{what}: {name} differs ({} vs {} bytes)", got.len(), bytes.len());
    }
}

/// Tensors by name, dtype and shape.
type Specs = Vec<(String, Dtype, Vec<usize>)>;

/// A small Llama-shaped checkpoint in two shards: column-parallel q, k, v, gate and up,
/// row-parallel o and down (with a bias, replicated), a vocabulary-parallel embedding and
/// head whose vocabulary (1000) is not a multiple of 64, and norms.
fn llama(dir: &std::path::Path) -> (BTreeMap<String, Vec<u8>>, Specs) {
    let layer = |i: usize| -> Specs {
        let p = format!("model.layers.{i}");
        vec![
            (format!("{p}.input_layernorm.weight"), Dtype::BF16, vec![64]),
            (format!("{p}.self_attn.q_proj.weight"), Dtype::BF16, vec![64, 64]),
            (format!("{p}.self_attn.k_proj.weight"), Dtype::BF16, vec![32, 64]),
            (format!("{p}.self_attn.v_proj.weight"), Dtype::BF16, vec![32, 64]),
            (format!("{p}.self_attn.o_proj.weight"), Dtype::BF16, vec![64, 64]),
            (format!("{p}.self_attn.o_proj.bias"), Dtype::F32, vec![64]),
            (format!("{p}.mlp.gate_proj.weight"), Dtype::BF16, vec![176, 64]),
            (format!("{p}.mlp.up_proj.weight"), Dtype::BF16, vec![176, 64]),
            (format!("{p}.mlp.down_proj.weight"), Dtype::F32, vec![64, 176]),
        ]
    };
    let mut a = vec![("model.embed_tokens.weight".to_owned(), Dtype::BF16, vec![1000, 64])];
    a.extend(layer(0));
    let mut b = layer(1);
    b.push(("model.norm.weight".to_owned(), Dtype::F32, vec![64]));
    b.push(("lm_head.weight".to_owned(), Dtype::F16, vec![1000, 64]));
    let sa: Vec<Spec<'_>> = a.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
    let sb: Vec<Spec<'_>> = b.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
    let truth = write_sharded(dir, &[&sa, &sb]);
    (truth, a.into_iter().chain(b).collect())
}

/// Rank `rank` of `world`'s bytes of each tensor, sliced here from the whole tensor's bytes
/// by the rules vLLM applies (independently of the loader's slicing).
fn rank_truth(
    full: &BTreeMap<String, Vec<u8>>,
    specs: &[(String, Dtype, Vec<usize>)],
    rank: usize,
    world: usize,
) -> BTreeMap<String, Vec<u8>> {
    let rules = Sharding::llama(0, world, 8).unwrap();
    specs
        .iter()
        .map(|(name, dtype, shape)| {
            let share = |n: usize| rank * n / world..(rank + 1) * n / world;
            let mut ranges: Vec<Range<usize>> = shape.iter().map(|&n| 0..n).collect();
            match (rules.split_of(name), shape.len()) {
                (Split::Column, _) => ranges[0] = share(shape[0]),
                (Split::Row, 2) => ranges[1] = share(shape[1]),
                (Split::Vocab, _) => {
                    let per = shape[0].next_multiple_of(64) / world;
                    ranges[0] = (rank * per).min(shape[0])..((rank + 1) * per).min(shape[0]);
                }
                _ => {}
            }
            (name.clone(), slice_bytes(&full[name], shape, dtype.bitsize() / 8, &ranges))
        })
        .collect()
}

#[test]
fn replicas_land_on_every_device_from_one_read() {
    let _d = driver();
    let Some(devs) = devices(4) else { return };
    let dir = scratch();
    let path = dir.join("quirky.safetensors");
    let truth = tensorlift_testkit::write_shard(&path, &quirky());
    // Slow copies and three staging chunks: a chunk back in the pool before every device's
    // copies from it ran would show as wrong bytes on some device.
    emulator::set_fault(Fault::CopyDelayMicros(300));
    for chunk in [4096usize, 1 << 20] {
        let what = format!("chunk {chunk}");
        let one = Loader::builder().device(Device::Cuda(0)).chunk_size(chunk).build().unwrap();
        let read_once = one.load_blocking(&path).unwrap().stats().bytes_read;
        let registered = emulator::live().map(|l| l.registrations);
        let loader = Loader::builder()
            .devices(devs.iter().map(|&d| DevicePlan::replica(d)))
            .chunk_size(chunk)
            .staging_budget(3 * chunk)
            .build()
            .unwrap();
        assert_eq!(loader.devices(), devs);
        assert_eq!(loader.pinned_staging(), Some(3 * chunk as u64), "{what}");
        // One pinned pool for every device: one more host registration, not four.
        let more = emulator::live().map(|l| l.registrations).zip(registered).map(|(a, b)| a - b);
        assert!(more.is_none_or(|m| m == 1), "{what}: {more:?} pools pinned");
        let models = loader.load_devices_blocking(&path).unwrap();
        assert_eq!(models.len(), devs.len());
        for (m, &d) in models.iter().zip(&devs) {
            assert_model(m, d, &truth, &format!("{what} on {d}"));
            assert_eq!(m.stats().bytes_read, read_once, "{what}: read once for every device");
            assert!(m.stats().max_in_flight_bytes <= 3 * chunk as u64, "{what}");
        }
    }
}

#[test]
fn tensor_parallel_devices_get_exactly_their_slices_from_one_read() {
    let _d = driver();
    let dir = scratch();
    let (full, specs) = llama(&dir);
    emulator::set_fault(Fault::CopyDelayMicros(100));
    for world in [2usize, 4] {
        let Some(devs) = devices(world) else { return };
        let plans = devs.iter().enumerate().map(|(r, &d)| DevicePlan::shard(d, Sharding::llama(r, world, 8).unwrap()));
        for chunk in [4096usize, 64 << 10] {
            let what = format!("TP {world}, chunk {chunk}");
            let loader = Loader::builder().devices(plans.clone()).chunk_size(chunk).build().unwrap();
            let models = loader.load_devices_blocking(&dir).unwrap();
            let checkpoint = models[0].stats().checkpoint_bytes;
            let mut per_rank_reads = 0;
            for (rank, (m, &d)) in models.iter().zip(&devs).enumerate() {
                assert_model(m, d, &rank_truth(&full, &specs, rank, world), &format!("{what}, rank {rank}"));
                // Each byte once: the checkpoint's bytes, and less than a page a shard more
                // (reads start on the page the header ends in).
                let read = m.stats().bytes_read;
                assert!(read >= checkpoint && read < checkpoint + 2 * 4096, "{what}: {read} read for {checkpoint}");
                // What the same rank reads loading alone (its rows, and the row-parallel
                // tensors whole).
                let alone = Loader::builder()
                    .device(d)
                    .shard(Sharding::llama(rank, world, 8).unwrap())
                    .chunk_size(chunk)
                    .build()
                    .unwrap()
                    .load_blocking(&dir)
                    .unwrap();
                assert_model(&alone, d, &rank_truth(&full, &specs, rank, world), &format!("{what}, rank {rank} alone"));
                per_rank_reads += alone.stats().bytes_read;
            }
            assert!(per_rank_reads > models[0].stats().bytes_read, "{what}: ranks reading alone read more");
        }
    }
    // Two ranks of four in this process (as on a node running two processes of two GPUs):
    // the load reads the rows those two need (and gaps under a MiB between them), no more
    // than the two read alone, and less than the checkpoint.
    let Some(devs) = devices(2) else { return };
    let alone = |rank: usize| {
        let b = Loader::builder().device(devs[0]).shard(Sharding::llama(rank, 4, 8).unwrap()).chunk_size(4096);
        b.build().unwrap().load_blocking(&dir).unwrap().stats().bytes_read
    };
    let plans = [
        DevicePlan::shard(devs[0], Sharding::llama(1, 4, 8).unwrap()),
        DevicePlan::shard(devs[1], Sharding::llama(2, 4, 8).unwrap()),
    ];
    let loader = Loader::builder().devices(plans.clone()).chunk_size(4096).build().unwrap();
    let models = loader.load_devices_blocking(&dir).unwrap();
    for (k, rank) in [1, 2].into_iter().enumerate() {
        assert_model(&models[k], devs[k], &rank_truth(&full, &specs, rank, 4), &format!("rank {rank} of 4"));
    }
    let read = models[0].stats().bytes_read;
    let (one, two) = (alone(1), alone(2));
    assert!(read <= one + two && read < models[0].stats().checkpoint_bytes, "{read} read ({one} + {two})");
    // One rank's plan alone reads what that rank's loader reads.
    let single = Loader::builder().devices([plans[0].clone()]).chunk_size(4096).build().unwrap();
    let m = single.load_blocking(&dir).unwrap();
    assert_model(&m, devs[0], &rank_truth(&full, &specs, 1, 4), "rank 1 of 4, one device plan");
    assert_eq!(m.stats().bytes_read, one);
}

#[test]
fn replicas_and_shards_mix_and_convert_on_each_device() {
    let _d = driver();
    let Some(devs) = devices(3) else { return };
    let dir = scratch();
    let (full, specs) = llama(&dir);
    // Device 0 holds the whole model, devices 1 and 2 a tensor-parallel pair; every floating
    // tensor is converted to f32 by each device's own kernels.
    let loader = Loader::builder()
        .devices([
            DevicePlan::replica(devs[0]),
            DevicePlan::shard(devs[1], Sharding::llama(0, 2, 8).unwrap()),
            DevicePlan::shard(devs[2], Sharding::llama(1, 2, 8).unwrap()),
        ])
        .convert_to(Dtype::F32)
        .chunk_size(8192)
        .build()
        .unwrap();
    let to_f32 = |want: BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        want.into_iter()
            .map(|(name, bytes)| {
                let dtype = specs.iter().find(|s| s.0 == name).unwrap().1;
                let values: Vec<f32> = match dtype {
                    Dtype::BF16 => bytes.chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    Dtype::F16 => bytes.chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    _ => return (name, bytes),
                };
                (name, values.iter().flat_map(|v| v.to_le_bytes()).collect())
            })
            .collect()
    };
    let models = loader.load_devices_blocking(&dir).unwrap();
    let stored = |want: &BTreeMap<String, Vec<u8>>| want.values().map(|b| b.len() as u64).sum::<u64>();
    assert_tensors(&models[0], devs[0], &to_f32(full.clone()), "replica");
    assert_eq!(models[0].stats().bytes, stored(&full), "replica: bytes as stored");
    for rank in 0..2 {
        let want = rank_truth(&full, &specs, rank, 2);
        assert_tensors(&models[rank + 1], devs[rank + 1], &to_f32(want.clone()), "shard");
        assert_eq!(models[rank + 1].stats().bytes, stored(&want), "shard: bytes as stored");
    }
    assert!(models.iter().all(|m| m.tensors().iter().all(|t| t.dtype() == Dtype::F32)));
}

#[test]
fn a_fault_on_one_device_ends_the_load_on_every_device() {
    let _d = driver();
    if !emulator::is_emulated() {
        return;
    }
    let Some(devs) = devices(4) else { return };
    let dir = scratch();
    let (_, _) = llama(&dir);
    let loader =
        || Loader::builder().devices(devs.iter().map(|&d| DevicePlan::replica(d))).chunk_size(4096).build().unwrap();
    // A copy to device 2 fails mid-load: the load fails naming that device, and the other
    // devices' memory, streams and staging are freed (the Driver's drop checks).
    emulator::set_fault(Fault::CopyDelayMicros(200));
    emulator::set_fault(Fault::OnDevice(Some(2)));
    emulator::set_fault(Fault::FailCopy(5));
    match loader().load_devices_blocking(&dir) {
        Err(LoadError::Copy { device, .. }) => assert_eq!(device, Device::Cuda(2)),
        other => panic!("{other:?}"),
    }
    // Too little memory on device 3 alone: refused before a byte is read or copied.
    emulator::reset();
    emulator::set_fault(Fault::OnDevice(Some(3)));
    emulator::set_fault(Fault::DeviceMemory(64 << 10));
    match loader().load_devices_blocking(&dir) {
        Err(LoadError::DeviceMemory { device, .. }) => assert_eq!(device, Device::Cuda(3)),
        other => panic!("{other:?}"),
    }
    assert_eq!(emulator::copies(), Some(0), "nothing was copied to any device");
    // A stream dropped after its first tensor, copies in flight on every device.
    emulator::reset();
    emulator::set_fault(Fault::CopyDelayMicros(1_000));
    let loader = loader();
    let mut stream = loader.stream_blocking(&dir).unwrap();
    let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
    drop(stream);
    drop(first);
    // The loader still loads onto every device afterwards.
    emulator::reset();
    assert_eq!(loader.load_devices_blocking(&dir).unwrap().len(), 4);
}

#[test]
fn one_device_plan_is_todays_load_and_misuse_is_refused() {
    let _d = driver();
    // (One device: this runs on a one-GPU host too, where it is the no-regression check.)
    let Some(devs) = devices(1) else { return };
    let dir = scratch();
    let (full, _) = llama(&dir);
    // One device plan: what a loader for that device loads and reads, load() included.
    let last = *devs.last().unwrap();
    let today = Loader::builder().device(last).chunk_size(64 << 10).build().unwrap().load_blocking(&dir).unwrap();
    let loader = Loader::builder().devices([DevicePlan::replica(last)]).chunk_size(64 << 10).build().unwrap();
    assert_eq!(loader.device(), last);
    let model = loader.load_blocking(&dir).unwrap();
    assert_model(&model, last, &full, "one device plan");
    assert_model(&today, last, &full, "one device");
    assert_eq!(model.stats().bytes_read, today.stats().bytes_read);
    let refused = |r: Result<Loader, LoadError>| match r {
        Err(LoadError::Unsupported(what)) => what,
        other => panic!("{other:?}"),
    };
    let r = |p: Vec<DevicePlan>| Loader::builder().devices(p);
    let rep = DevicePlan::replica;
    assert_eq!(refused(r(vec![rep(devs[0]), rep(devs[0])]).build()), "cuda:0 twice in devices()");
    assert_eq!(
        refused(r(vec![rep(devs[0]), rep(Device::Cpu)]).build()),
        "cpu in devices() (a load onto several devices is onto CUDA devices)"
    );
    assert_eq!(
        refused(r(vec![rep(devs[0])]).device(Device::Cuda(0)).build()),
        "device() with devices() (each device plan names its device)"
    );
    assert_eq!(
        refused(r(vec![rep(devs[0])]).shard(Sharding::llama(0, 2, 8).unwrap()).build()),
        "loader-wide slices with devices() (give each device plan its slices)"
    );
    assert_eq!(refused(r(Vec::new()).build()), "devices() with no device");
    match Loader::builder().devices([rep(Device::Cuda(64))]).build() {
        Err(LoadError::CudaUnavailable { ordinal: 64, .. }) => {}
        other => panic!("{other:?}"),
    }
    // Several devices: one model would repeat names.
    let Some(devs) = devices(2) else { return };
    let two = Loader::builder().devices(devs.iter().map(|&d| DevicePlan::replica(d))).build().unwrap();
    assert_eq!(
        two.load_blocking(&dir).unwrap_err().to_string(),
        "not supported: one model from a load onto 2 devices (its tensors' names repeat): use load_devices, or stream"
    );
}

#[test]
fn each_device_takes_its_own_slices_empty_ones_included() {
    use tensorlift::TensorSlice;
    let _d = driver();
    let Some(devs) = devices(3) else { return };
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let specs: &[Spec<'static>] =
        &[("head", Dtype::U8, &[5000]), ("m", Dtype::F32, &[40, 30]), ("tail", Dtype::BF16, &[700, 8])];
    let full = tensorlift_testkit::write_shard(&path, specs);
    let part = |name: &str, ranges: Vec<Range<usize>>| {
        let &(_, dtype, shape) = specs.iter().find(|s| s.0 == name).unwrap();
        slice_bytes(&full[name], shape, dtype.bitsize() / 8, &ranges)
    };
    // Device 0: no rows of m (an empty part, which lies at m's first byte) and rows of
    // tail; device 1: columns of m; device 2: rows 30..40 of m and tail whole.
    let plans = [
        DevicePlan::replica(devs[0]).slice("m", TensorSlice::rows(12..12)).slice("tail", TensorSlice::rows(600..700)),
        DevicePlan::replica(devs[1]).slice("m", TensorSlice::new([0..40, 7..19])),
        DevicePlan::replica(devs[2]).slice("m", TensorSlice::rows(30..40)),
    ];
    let want = [
        [("head", full["head"].clone()), ("m", Vec::new()), ("tail", part("tail", vec![600..700, 0..8]))],
        [("head", full["head"].clone()), ("m", part("m", vec![0..40, 7..19])), ("tail", full["tail"].clone())],
        [("head", full["head"].clone()), ("m", part("m", vec![30..40, 0..30])), ("tail", full["tail"].clone())],
    ];
    emulator::set_fault(Fault::CopyDelayMicros(100));
    for chunk in [4096usize, 1 << 20] {
        let loader = Loader::builder().devices(plans.clone()).chunk_size(chunk).build().unwrap();
        let models = loader.load_devices_blocking(&path).unwrap();
        for (k, want) in want.iter().enumerate() {
            let want: BTreeMap<String, Vec<u8>> = want.iter().map(|(n, b)| (n.to_string(), b.clone())).collect();
            assert_model(&models[k], devs[k], &want, &format!("chunk {chunk}, device {k}"));
        }
        assert_eq!(models[0].get("m").unwrap().shape(), &[0, 30]);
        assert_eq!(models[1].get("m").unwrap().shape(), &[40, 12]);
    }
}

#[test]
fn the_read_starts_where_an_empty_part_lies_and_filters_and_progress_hold() {
    use std::sync::{Arc, Mutex};
    use tensorlift::TensorSlice;
    let _d = driver();
    let Some(devs) = devices(2) else { return };
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let specs: &[Spec<'static>] =
        &[("big", Dtype::F32, &[4000, 1024]), ("small", Dtype::U8, &[1000]), ("other", Dtype::BF16, &[2000, 512])];
    let full = tensorlift_testkit::write_shard(&path, specs);
    let rows = |r: Range<usize>| slice_bytes(&full["big"], &[4000, 1024], 4, &[r, 0..1024]);
    // No rows of big on device 0 (an empty part, at big's first byte), rows 30..40 on device
    // 1: the load reads big's rows 0..40 and small, not the 16 MB of big's other rows.
    let plans = [
        DevicePlan::replica(devs[0]).slice("big", TensorSlice::rows(12..12)),
        DevicePlan::replica(devs[1]).slice("big", TensorSlice::rows(30..40)),
    ];
    let last = Arc::new(Mutex::new((0u64, 0u64)));
    let seen = Arc::clone(&last);
    let loader = Loader::builder()
        .devices(plans)
        .filter(["big", "small"])
        .chunk_size(64 << 10)
        .progress(move |p| *seen.lock().unwrap() = (p.done, p.total))
        .build()
        .unwrap();
    let models = loader.load_devices_blocking(&path).unwrap();
    let want = |big: Vec<u8>| BTreeMap::from([("big".to_owned(), big), ("small".to_owned(), full["small"].clone())]);
    assert_model(&models[0], devs[0], &want(Vec::new()), "device 0");
    assert_model(&models[1], devs[1], &want(rows(30..40)), "device 1");
    let read = models[0].stats().bytes_read;
    assert!(read < 1 << 20, "{read} bytes read");
    let (done, total) = *last.lock().unwrap();
    assert_eq!((done, total), (read, read), "progress ends at every read byte, on every device");
}

/// A PyTorch file whose `lm_head.weight` is `embed.weight` (tied), beside views of one
/// storage, onto two devices: every name on each, the twins sharing one place on each.
#[test]
fn tied_pytorch_weights_on_every_device() {
    let _d = driver();
    let Some(devs) = devices(2) else { return };
    let (dir, truth) = super::tied_pytorch_checkpoint();
    let loader =
        Loader::builder().devices(devs.iter().map(|&d| DevicePlan::replica(d))).chunk_size(4096).build().unwrap();
    let models = loader.load_devices_blocking(&dir).unwrap();
    for (m, &d) in models.iter().zip(&devs) {
        assert_eq!(m.len(), truth.len());
        for (name, want) in &truth {
            let t = m.get(name).unwrap();
            assert_eq!(t.location(), d, "{name}");
            assert!(t.to_host().unwrap().as_ref() == want.as_slice(), "{name} on {d}");
        }
        let ptr = |name: &str| m.get(name).unwrap().device_ptr().unwrap();
        assert_eq!(ptr("embed.weight"), ptr("lm_head.weight"), "on {d}");
    }
}
