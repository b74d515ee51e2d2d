//! Dropping a load mid-flight frees everything and leaves nothing running. Its own test
//! binary, since it counts the process's live arenas.

use std::time::{Duration, Instant};

use tensorlift::format::encode_header;
use tensorlift::io::{BackendKind, HostArena};
use tensorlift::{Device, Dtype, Loader};

fn checkpoint() -> std::path::PathBuf {
    let dir = tempfile::Builder::new().prefix("tl-cancel-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep();
    let specs: Vec<(String, Dtype, Vec<usize>)> =
        (0..16).map(|i| (format!("t{i}"), Dtype::U8, vec![4 << 20])).collect();
    let specs: Vec<_> = specs.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
    let enc = encode_header(&specs, None).unwrap();
    let mut file = enc.bytes.clone();
    file.resize(file.len() + enc.data_len() as usize, 0x5a);
    let path = dir.join("m.safetensors");
    std::fs::write(&path, file).unwrap();
    path
}

fn wait_for_no_arenas() {
    let t = Instant::now();
    while HostArena::live_count() != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "{} arenas still alive", HostArena::live_count());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cancelled_loads_free_everything() {
    let path = checkpoint();
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        let loader = Loader::builder().device(Device::Cpu).io_backend(backend).chunk_size(1 << 20).build().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        // A load future dropped with reads in flight.
        let r = rt.block_on(async { tokio::time::timeout(Duration::from_micros(300), loader.load(&path)).await });
        assert!(r.is_err() || r.is_ok_and(|m| m.is_ok()));
        // A stream dropped after its first tensor.
        let mut stream = loader.stream(&path).unwrap();
        let first = tensorlift::io::block_on(stream.next()).unwrap().unwrap();
        assert_eq!(first.bytes().len(), 4 << 20);
        drop(first);
        drop(stream);
        // In-flight reads complete in the workers, which then drop the last references.
        wait_for_no_arenas();
        // And the loader still works afterwards.
        let m = loader.load_blocking(&path).unwrap();
        assert!(m.tensors().iter().all(|t| t.bytes().iter().all(|&b| b == 0x5a)));
        drop(m);
        drop(loader);
        assert_eq!(HostArena::live_count(), 0, "{backend:?}");
    }
}
