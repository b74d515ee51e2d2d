//! The C API from the outside: the committed header is what cbindgen writes now, and a C
//! program and a C++ example, compiled with the system compiler against the header and the
//! library cargo built, load a checkpoint on the host and on the emulated CUDA driver (a
//! real one with `TENSORLIFT_TEST_DRIVER=real`), once under AddressSanitizer.

use std::path::{Path, PathBuf};
use std::process::Command;

use tensorlift::Dtype;
use tensorlift_testkit::{scratch_in, write_sharded, Spec};

/// The crate's folder: where it was built, or, for this test copied elsewhere (a GPU host,
/// run from a copy of the repository), under the current folder.
fn crate_dir() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.is_dir() {
        built
    } else {
        PathBuf::from("crates/tensorlift-capi")
    }
}

/// The folder with `libtensorlift_c.a`: `TENSORLIFT_CAPI_LIB_DIR` (scripts/gpu-host carries
/// it), else the one cargo put this test's libraries in (target/debug or target/release).
fn libraries() -> PathBuf {
    if let Some(dir) = std::env::var_os("TENSORLIFT_CAPI_LIB_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/capi-HASH
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

#[test]
fn the_committed_header_is_what_cbindgen_writes() {
    if std::env::var_os("TENSORLIFT_CAPI_LIB_DIR").is_some() {
        // Away from its build tree (a GPU host): cbindgen needs cargo, which is not there.
        eprintln!("TENSORLIFT_CAPI_LIB_DIR is set: the header is checked where the crate is built");
        return;
    }
    let bindings = cbindgen::generate(crate_dir()).expect("cbindgen");
    let mut now = Vec::new();
    bindings.write(&mut now);
    let path = crate_dir().join("include/tensorlift.h");
    if std::env::var_os("TENSORLIFT_BLESS").is_some() {
        std::fs::write(&path, &now).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == now,
        "{} is stale: write it again with TENSORLIFT_BLESS=1 cargo test -p tensorlift-capi --test capi header",
        path.display()
    );
}

/// The ABI the header's declarations were last checked at: `TL_ABI_VERSION`, and a hash
/// of every declaration in the header (comments and spacing left out, the version's own
/// `#define` too).
const CHECKED_ABI: (u32, u64) = (2, 0xc496_a600_25f2_47c5);

/// A change to the header's declarations (a struct's fields, an enum's values, a function's
/// signature, one added) fails this test until `TL_ABI_VERSION` is raised for it where it
/// breaks programs built against the old header, and `CHECKED_ABI` records the new state:
/// so that `tl_abi_version() == TL_ABI_VERSION` means what it says.
#[test]
fn a_change_to_the_headers_declarations_is_an_abi_decision() {
    let text = std::fs::read_to_string(crate_dir().join("include/tensorlift.h")).unwrap();
    // Comments out, then every run of spacing one space.
    let mut code = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        rest = rest[start..].find("*/").map_or("", |end| &rest[start + end + 2..]);
    }
    code.push_str(rest);
    let version: u32 = code
        .lines()
        .find_map(|l| l.trim().strip_prefix("#define TL_ABI_VERSION "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the header defines TL_ABI_VERSION");
    let declarations: Vec<&str> = code
        .lines()
        .filter(|l| !l.trim().starts_with("#define TL_ABI_VERSION"))
        .flat_map(str::split_whitespace)
        .collect();
    // FNV-1a, 64 bits: stable across Rust versions, as std's hasher is not.
    let hash = declarations
        .join(" ")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    assert_eq!(
        (version, hash),
        CHECKED_ABI,
        "the header's declarations changed: raise TL_ABI_VERSION (src/lib.rs) if the change breaks programs built \
         against the old header (a struct's fields, an enum's values, a signature), then set CHECKED_ABI in \
         tests/capi.rs to ({version}, {hash:#018x})"
    );
}

/// Where PyTorch keeps its C headers (`ATen/dlpack.h`: DLPack as PyTorch ships it), from
/// the test environment's python.
fn torch_include() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))"])
        .output()
        .expect("python3");
    assert!(out.status.success(), "torch (for ATen/dlpack.h): {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Compiles `sources` into `exe` with `compiler`, against the header and the static library
/// (or the shared one where only it is there: what scripts/gpu-host carries).
fn compile(compiler: &str, sources: &[PathBuf], exe: &Path, extra: &[&str]) {
    let mut cmd = Command::new(compiler);
    cmd.args(extra).arg("-g").arg("-I").arg(crate_dir().join("include")).arg("-I").arg(torch_include()).args(sources);
    let (lib, static_lib) = (libraries(), libraries().join("libtensorlift_c.a"));
    assert!(
        static_lib.is_file() || lib.join("libtensorlift_c.so").is_file(),
        "no libtensorlift_c in {}: run `cargo build -p tensorlift-capi` first (./scripts/test does; cargo test \
         builds only the Rust library)",
        lib.display()
    );
    if static_lib.is_file() {
        cmd.arg(static_lib);
    } else {
        cmd.arg("-L").arg(&lib).arg("-ltensorlift_c").arg(format!("-Wl,-rpath,{}", lib.display()));
    }
    // What Rust's standard library needs from the system.
    cmd.args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]).arg("-o").arg(exe);
    let out = cmd.output().unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(out.status.success(), "{compiler}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `exe` with `args`, on the emulated CUDA driver unless a real one is asked for.
fn run(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(exe);
    cmd.args(args).envs(env.iter().copied());
    if !tensorlift_testkit::real_driver() {
        cmd.env("TENSORLIFT_LIBCUDA", tensorlift_testkit::emulated_driver());
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn checkpoint(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let a: &[Spec<'_>] = &[("a.w", Dtype::BF16, &[64, 33]), ("a.b", Dtype::F32, &[7]), ("a.s", Dtype::I64, &[])];
    let b: &[Spec<'_>] = &[("b.e", Dtype::F16, &[0, 4]), ("b.w", Dtype::U8, &[300, 5])];
    write_sharded(dir, &[a, b])
}

#[test]
fn a_c_program_loads_on_the_host_and_the_device_and_under_asan() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-capi-");
    let truth = checkpoint(&dir.join("model"));
    let exe = dir.join("test_capi");
    compile("cc", &[crate_dir().join("tests/c/test_capi.c")], &exe, &["-std=c11", "-Wall", "-Werror"]);
    let asan = dir.join("test_capi_asan");
    compile(
        "cc",
        &[crate_dir().join("tests/c/test_capi.c")],
        &asan,
        &["-std=c11", "-fsanitize=address", "-fno-omit-frame-pointer"],
    );
    let model = dir.join("model");
    // Several reads of the default 8 MiB, for a stream dropped after its first tensor.
    let names = ["big.0", "big.1", "big.2", "big.3"];
    let specs: Vec<Spec<'_>> = names.iter().map(|n| (*n, Dtype::U8, &[6usize << 20][..])).collect();
    let big = dir.join("big.safetensors");
    let big_truth = tensorlift_testkit::write_shard(&big, &specs);
    for (what, program, device) in
        [("host", &exe, "cpu"), ("cuda", &exe, "cuda:0"), ("host, asan", &asan, "cpu"), ("cuda, asan", &asan, "cuda:0")]
    {
        let out = dir.join(what.replace(", ", "-"));
        std::fs::create_dir_all(&out).unwrap();
        // (A real driver keeps allocations of its own until the process ends: leaks are
        // looked for on the emulated one.)
        let real_cuda = device.starts_with("cuda") && tensorlift_testkit::real_driver();
        let leaks = if real_cuda { "0" } else { "1" };
        // (AddressSanitizer protects its shadow gap, an address range the real driver maps
        // memory into: `cuInit` fails unless the gap is left unprotected.)
        let gap = if real_cuda { ":protect_shadow_gap=0" } else { "" };
        let options = format!("detect_leaks={leaks}:abort_on_error=0:exitcode=99{gap}");
        let env = [("ASAN_OPTIONS", options.as_str())];
        let args = [model.to_str().unwrap(), device, out.to_str().unwrap(), big.to_str().unwrap()];
        let (ok, stdout, stderr) = run(program, &args, &env);
        assert!(ok, "{what}: {stdout}\n{stderr}");
        assert!(stdout.contains(&format!("ok {} tensors", truth.len())), "{what}: {stdout}");
        assert!(stdout.contains("tensor a.w BF16 [64,33] "), "{what}: {stdout}");
        assert!(stdout.contains("tensor a.s I64 [] "), "{what}: {stdout}");
        assert!(stdout.contains("slice "), "{what}: {stdout}");
        let on_device = device.starts_with("cuda");
        assert!(stdout.contains(if on_device { "device cuda:0" } else { "device cpu" }), "{what}: {stdout}");
        // What the program read through the host pointers, or back from the device, is the
        // file's bytes.
        for (name, want) in &truth {
            let got = std::fs::read(out.join(format!("{name}.bin"))).unwrap();
            assert!(&got == want, "{what}: {name} differs");
        }
        // The first tensor of the stream dropped midway, as the program read it.
        let first = stdout.lines().find_map(|l| l.strip_prefix("midway ")).expect("no midway line");
        let got = std::fs::read(out.join("midway.bin")).unwrap();
        assert!(big_truth.get(first) == Some(&got), "{what}: the midway stream's {first} differs");
    }
}

#[test]
fn the_cpp_example_builds_and_runs() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-capi-cpp-");
    let truth = checkpoint(&dir.join("model"));
    let exe = dir.join("load");
    compile("c++", &[crate_dir().join("examples/cpp/load.cpp")], &exe, &["-std=c++17", "-Wall", "-Werror"]);
    let model = dir.join("model");
    let (ok, stdout, stderr) = run(&exe, &[model.to_str().unwrap(), "cpu"], &[]);
    assert!(ok, "{stdout}\n{stderr}");
    let total: usize = truth.values().map(Vec::len).sum();
    assert!(stdout.contains(&format!("{} tensors, {total} bytes", truth.len())), "{stdout}");
    assert!(stdout.contains("a.w BF16 4224 bytes on host"), "{stdout}");
    // A failure comes back as an exception with the library's message.
    let (ok, _, stderr) = run(&exe, &[dir.join("missing").to_str().unwrap(), "cpu"], &[]);
    assert!(!ok && stderr.contains("error 3: ") && stderr.contains("missing"), "{stderr}");
}

#[test]
fn a_name_with_a_nul_fails_and_a_path_need_not_be_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch_in(&std::env::temp_dir(), "tl-capi-names-");
    // "w\u0000x", "w" and "z", in the file in that order: the first would reach C as "w" were
    // its name cut at the NUL; a stream fails there, and gives nothing after.
    let header = br#"{"w\u0000x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"z":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(b"FRZ");
    let nul = dir.join("nul.safetensors");
    std::fs::write(&nul, &file).unwrap();
    // A folder whose name is Latin-1, not UTF-8, holding a plain checkpoint.
    let latin = dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    std::fs::create_dir_all(&latin).unwrap();
    write_sharded(&latin, &[&[("x", Dtype::F32, &[3])]]);

    let exe = dir.join("test_names");
    compile("cc", &[crate_dir().join("tests/c/test_names.c")], &exe, &["-std=c11", "-Wall", "-Werror"]);
    let out = Command::new(&exe).arg(&nul).arg(&latin).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("ok"), "{stdout}\n{stderr}");
}

/// The C calls of the cancellation test, each a safe function over one call under its
/// contract: the handles passed are live (made by these functions, freed once, last),
/// strings are NUL-terminated and outlive the call, and out-parameters are locals.
mod c {
    use std::ffi::{CStr, CString};
    use std::ptr::null_mut;
    use tensorlift_c::*;

    /// A stream handle that a second thread may use for `tl_stream_next` while this one
    /// calls `tl_stream_cancel`, the one call the API allows alongside it.
    #[derive(Clone, Copy)]
    pub struct Stream(*mut TlStream);
    // SAFETY: the API lets one thread wait in `tl_stream_next` while another cancels.
    unsafe impl Send for Stream {}

    pub fn last_error() -> String {
        // SAFETY: the text is NUL-terminated and lives as long as the thread.
        unsafe { CStr::from_ptr(tl_last_error()) }.to_string_lossy().into_owned()
    }

    /// A CPU loader, with its options.
    pub fn cpu_loader() -> (*mut TlOptions, *mut TlLoader) {
        let (mut options, mut loader) = (null_mut(), null_mut());
        // SAFETY: as the module says.
        assert_eq!(unsafe { tl_options_new(&mut options) }, TlStatus::Ok);
        // SAFETY: as the module says.
        assert_eq!(unsafe { tl_options_set_device(options, c"cpu".as_ptr()) }, TlStatus::Ok);
        // SAFETY: as the module says.
        assert_eq!(unsafe { tl_loader_new(options, &mut loader) }, TlStatus::Ok);
        (options, loader)
    }

    pub fn free_loader((options, loader): (*mut TlOptions, *mut TlLoader)) {
        // SAFETY: as the module says.
        unsafe { tl_loader_free(loader) };
        // SAFETY: as the module says.
        unsafe { tl_options_free(options) };
    }

    pub fn open(loader: *mut TlLoader, path: &CString) -> Stream {
        let mut stream = null_mut();
        // SAFETY: as the module says.
        let status = unsafe { tl_stream_open(loader, path.as_ptr(), &mut stream) };
        assert_eq!(status, TlStatus::Ok, "{}", last_error());
        Stream(stream)
    }

    /// `tl_stream_next`'s status, whether it gave no tensor, and the message it left.
    pub fn next(s: Stream) -> (TlStatus, bool, String) {
        let mut tensor = null_mut();
        // SAFETY: as the module says.
        let status = unsafe { tl_stream_next(s.0, &mut tensor) };
        let none = tensor.is_null();
        // SAFETY: as the module says (null is allowed).
        unsafe { tl_tensor_free(tensor) };
        (status, none, last_error())
    }

    pub fn cancel(s: Stream) -> TlStatus {
        // SAFETY: as the module says.
        unsafe { tl_stream_cancel(s.0) }
    }

    pub fn stats(s: Stream) -> serde_json::Value {
        let mut text = std::ptr::null();
        // SAFETY: as the module says.
        assert_eq!(unsafe { tl_stream_stats_json(s.0, &mut text) }, TlStatus::Ok);
        // SAFETY: a NUL-terminated text, valid until the stream's next call.
        serde_json::from_str(&unsafe { CStr::from_ptr(text) }.to_string_lossy()).unwrap()
    }

    pub fn free(s: Stream) {
        // SAFETY: as the module says.
        unsafe { tl_stream_free(s.0) };
    }
}

/// `tl_stream_cancel`, from another thread, ends a `tl_stream_next` that waits for data the
/// server holds back (for a minute): the call returns `TL_STATUS_CANCELLED` with no tensor,
/// every later call says the same, the stats stay readable, and the held requests are given
/// up with the load. A stream cancelled before its first `tl_stream_next` gives nothing.
#[test]
fn a_stream_cancelled_from_another_thread_stops_its_waiting_next() {
    use std::ffi::CString;
    use std::time::{Duration, Instant};
    use tensorlift_c::TlStatus;
    use tensorlift_testkit::net::{Fault, FaultProxy, HttpServer, Rule};

    let dir = scratch_in(&std::env::temp_dir(), "tl-capi-cancel-");
    let truth = tensorlift_testkit::write_shard(
        &dir.join("m.safetensors"),
        &[("a", Dtype::U8, &[1 << 20]), ("b", Dtype::F32, &[1000])],
    );
    assert_eq!(truth.len(), 2);
    let http = HttpServer::start(&dir).unwrap();
    // Planning's ranged GET goes through; every later one (the data) is held for a minute.
    let hold =
        Rule { needle: "range: bytes=".into(), nth: 2, every: true, fault: Fault::Delay(Duration::from_secs(60)) };
    let proxy = FaultProxy::start(http.port, vec![hold]).unwrap();
    let held = |p: &FaultProxy| p.log().iter().filter(|(_, f)| f.is_some()).count();
    let url = CString::new(format!("http://127.0.0.1:{}/m.safetensors", proxy.port)).unwrap();
    let local = CString::new(dir.join("m.safetensors").into_os_string().into_encoded_bytes()).unwrap();
    let loader = c::cpu_loader();

    // Cancelled before its first tensor: nothing comes, and the stream is still freed.
    let stream = c::open(loader.1, &local);
    assert_eq!(c::cancel(stream), TlStatus::Ok);
    let (status, none, _) = c::next(stream);
    assert_eq!((status, none), (TlStatus::Cancelled, true));
    c::free(stream);

    // Cancelled while another thread waits in tl_stream_next.
    let stream = c::open(loader.1, &url);
    let waiting = std::thread::spawn(move || c::next(stream));
    // The data GETs are made only by that call's load: once one is held, it waits.
    let t = Instant::now();
    while held(&proxy) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no data GET was made");
        std::thread::sleep(Duration::from_millis(10));
    }
    let cancelled = Instant::now();
    assert_eq!(c::cancel(stream), TlStatus::Ok);
    let (status, none, message) = waiting.join().unwrap();
    // (Not a speed check: a call not woken would wait for the held minute.)
    assert!(cancelled.elapsed() < Duration::from_secs(30), "tl_stream_next went on waiting");
    assert_eq!((status, none), (TlStatus::Cancelled, true), "{message}");
    assert!(message.contains("cancelled (tl_stream_cancel)"), "{message}");
    // Every later call says the same; a second cancel changes nothing.
    assert_eq!(c::cancel(stream), TlStatus::Ok);
    assert_eq!(c::next(stream).0, TlStatus::Cancelled);
    let stats = c::stats(stream);
    assert_eq!((&stats["tensors_loaded"], &stats["bytes_read"]), (&0.into(), &0.into()), "{stats}");
    c::free(stream);
    c::free_loader(loader);
    // The load's held requests went with it, well before their minute was up.
    let t = Instant::now();
    while proxy.abandoned() < held(&proxy) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.abandoned(), held(&proxy), "requests left running after the cancelled load");
}
