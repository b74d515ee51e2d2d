//! The probe against real stand-ins for the driver: fake libcuda libraries compiled here
//! with the C compiler, so every branch runs without a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

use tensorlift_cuda::{probe_library, CudaStatus};

/// The probe, on the libraries these tests name: none, or fake drivers built from C whose
/// driver functions have the driver API's signatures.
fn probe(candidates: &[PathBuf]) -> CudaStatus {
    // SAFETY: every candidate that exists is one of the fake drivers `fake_libcuda` builds.
    unsafe { probe_library(candidates) }
}

/// Compiles `body` into a shared library exporting the driver calls the probe uses.
fn fake_libcuda(dir: &Path, name: &str, body: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let so = dir.join(format!("{name}.so"));
    std::fs::write(&src, format!("#include <string.h>\n#include <stddef.h>\n{body}")).unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is needed for the probe tests");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    so
}

const NAMES: &str = r#"
int cuGetErrorName(int e, const char **s) { *s = e == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN"; return 0; }
"#;

#[test]
fn missing_library_is_a_reason() {
    match probe(&[PathBuf::from("/nonexistent/libcuda.so.1")]) {
        CudaStatus::Unavailable(why) => {
            assert!(why.contains("no NVIDIA driver library") && why.contains("/nonexistent/libcuda.so.1"), "{why}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn this_machine_has_a_status_and_never_panics() {
    // Whatever this machine has, the probe answers: devices described, or the reason.
    let s = tensorlift_cuda::cuda_status();
    println!("{s}");
    match s {
        CudaStatus::Available(d) => {
            assert!(d.version > 0 && !d.devices.is_empty());
            assert!(d.devices.iter().all(|x| !x.name.is_empty() && x.total_memory > 0));
        }
        CudaStatus::Unavailable(why) => {
            assert!(!why.is_empty());
            // Opening a device must refuse with the same reason, never reach cudarc (which
            // panics without libcuda).
            match tensorlift_cuda::Gpu::open(0) {
                Err(tensorlift_cuda::CudaError::Unavailable(r)) => assert_eq!(&r, why),
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn init_failure_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let so = fake_libcuda(dir.path(), "noinit", &format!("{NAMES}\nint cuInit(unsigned f) {{ return 100; }}\nint cuDriverGetVersion(int *v) {{ *v = 12080; return 0; }}\nint cuDeviceGetCount(int *c) {{ *c = 0; return 0; }}\n"));
    // The variable that most often makes cuInit find no device is named where it is set:
    // checked in a run of this test with it set (the environment is read at the probe).
    let visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .map_or_else(|_| String::new(), |v| format!(" (CUDA_VISIBLE_DEVICES={v})"));
    match probe(&[so]) {
        CudaStatus::Unavailable(why) => assert_eq!(why, format!("cuInit failed: CUDA_ERROR_NO_DEVICE (100){visible}")),
        other => panic!("{other:?}"),
    }
    if std::env::var_os("TL_PROBE_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "init_failure_is_named", "--test-threads", "1"])
            .env("TL_PROBE_CHILD", "1")
            .env("CUDA_VISIBLE_DEVICES", "GPU-none")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn missing_symbol_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let so = fake_libcuda(dir.path(), "nosym", "int cuInit(unsigned f) { return 0; }\n");
    match probe(&[so]) {
        CudaStatus::Unavailable(why) => assert!(why.contains("lacks cuDriverGetVersion"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_devices_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let so = fake_libcuda(dir.path(), "nodev", &format!("{NAMES}\nint cuInit(unsigned f) {{ return 0; }}\nint cuDriverGetVersion(int *v) {{ *v = 13000; return 0; }}\nint cuDeviceGetCount(int *c) {{ *c = 0; return 0; }}\nint cuDeviceGet(int *d, int o) {{ return 0; }}\nint cuDeviceGetName(char *n, int l, int d) {{ return 0; }}\nint cuDeviceTotalMem_v2(size_t *m, int d) {{ return 0; }}\n"));
    match probe(&[so]) {
        CudaStatus::Unavailable(why) => assert!(why.starts_with("the driver sees no CUDA device"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn devices_are_described() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{NAMES}
int cuInit(unsigned f) {{ return f == 0 ? 0 : 1; }}
int cuDriverGetVersion(int *v) {{ *v = 13000; return 0; }}
int cuDeviceGetCount(int *c) {{ *c = 2; return 0; }}
int cuDeviceGet(int *d, int o) {{ *d = o + 10; return 0; }}
int cuDeviceGetName(char *n, int l, int d) {{ strncpy(n, d == 10 ? \"Fake H100\" : \"Fake H200\", l); return 0; }}
int cuDeviceTotalMem_v2(size_t *m, int d) {{ *m = (size_t)(d - 9) << 30; return 0; }}
int cuDeviceGetPCIBusId(char *b, int l, int d) {{ strncpy(b, \"0000:FF:00.0\", l); return 0; }}
"
    );
    let so = fake_libcuda(dir.path(), "twodev", &body);
    let CudaStatus::Available(info) = probe(&[PathBuf::from("/nonexistent/libcuda.so.1"), so.clone()]) else {
        panic!("not available")
    };
    assert_eq!(info.library, so);
    assert_eq!(info.version_string(), "13.0");
    assert_eq!(info.devices.len(), 2);
    assert_eq!(
        (info.devices[0].ordinal, info.devices[0].name.as_str(), info.devices[0].total_memory),
        (0, "Fake H100", 1 << 30)
    );
    assert_eq!((info.devices[1].name.as_str(), info.devices[1].total_memory), ("Fake H200", 2 << 30));
    assert_eq!(info.devices[0].pci_bus_id.as_deref(), Some("0000:ff:00.0"));
    assert_eq!(info.devices[0].pcie_link, None, "no such PCI device in sysfs");
    assert_eq!(info.devices[0].pcie_link_max, None, "no such PCI device in sysfs");
}
