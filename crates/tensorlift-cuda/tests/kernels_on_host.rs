//! The conversion kernels' arithmetic, without a GPU: `kernels/convert.cu` is also plain C,
//! so the host's C compiler builds it (with `tests/kernels/host.c`'s shims for the CUDA
//! names) and every 16-bit and 8-bit input, and a spread of f32 values, go through each
//! kernel and are compared with the host conversion (`tensorlift::convert`, which follows
//! the `half` crate). The same kernels run on a GPU in the engine's CUDA tests
//! (`scripts/gpu-host`); on the emulated driver, the emulator's own CPU versions run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use half::{bf16, f16};

/// The kernels compiled for the host, once.
fn host_kernels() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernels");
            let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tl-kernels-on-host");
            let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
            let out = Command::new(&cc)
                .args(["-std=c99", "-O1", "-Wall", "-Werror", "-o"])
                .arg(&exe)
                .arg(dir.join("host.c"))
                .output()
                .unwrap_or_else(|e| panic!("{cc} (the C compiler Rust links with) is needed: {e}"));
            assert!(
                out.status.success(),
                "compiling the kernels for the host:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            exe
        })
        .clone()
}

fn run(kernel: &str, input: &[u8]) -> Vec<u8> {
    let mut child =
        Command::new(host_kernels()).arg(kernel).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "{kernel}: {:?}", out.status);
    out.stdout
}

/// Bits as `half` makes them (the host path's reference), exactly: NaN payloads included,
/// since the kernels follow `half`'s own software conversion.
fn want(from: &str, to: &str, input: &[u8]) -> Vec<u8> {
    let decode = |c: &[u8]| -> f32 {
        match from {
            "bf16" => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            "f16" => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            "f32" => f32::from_le_bytes(c.try_into().unwrap()),
            "f8e5m2" => f16::from_bits(u16::from(c[0]) << 8).to_f32(),
            _ => f8_e4m3fn(c[0]),
        }
    };
    let width = match from {
        "bf16" | "f16" => 2,
        "f32" => 4,
        _ => 1,
    };
    input
        .chunks(width)
        .flat_map(|c| {
            let x = decode(c);
            match to {
                "bf16" => bf16::from_f32(x).to_le_bytes().to_vec(),
                "f16" => f16::from_f32(x).to_le_bytes().to_vec(),
                _ => x.to_le_bytes().to_vec(),
            }
        })
        .collect()
}

fn f8_e4m3fn(b: u8) -> f32 {
    let (sign, exp, man) = (b >> 7, (b >> 3) & 0xf, b & 7);
    let v = match (exp, man) {
        (0xf, 7) => f32::NAN,
        (0, m) => f32::from(m) * 2f32.powi(-9),
        (e, m) => (8.0 + f32::from(m)) * 2f32.powi(i32::from(e) - 10),
    };
    if sign == 1 {
        -v
    } else {
        v
    }
}

/// Whether two outputs agree: the same bits, or NaN for NaN with the same sign where the
/// host converted in hardware (F16C quiets NaN payloads its own way).
fn agree(to: &str, got: &[u8], want: &[u8]) -> Option<usize> {
    let w = if to == "f32" { 4 } else { 2 };
    let as_f32 = |c: &[u8]| match to {
        "bf16" => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
        "f16" => f16::from_le_bytes([c[0], c[1]]).to_f32(),
        _ => f32::from_le_bytes(c.try_into().unwrap()),
    };
    if got.len() != want.len() {
        return Some(usize::MAX);
    }
    got.chunks(w).zip(want.chunks(w)).position(|(g, e)| {
        let (a, b) = (as_f32(g), as_f32(e));
        g != e && !(a.is_nan() && b.is_nan() && a.is_sign_negative() == b.is_sign_negative())
    })
}

#[test]
fn every_16_and_8_bit_input_converts_as_on_the_host() {
    let every16: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    let every8: Vec<u8> = (0..=u8::MAX).collect();
    let mut f32s: Vec<u8> = (0..1u64 << 20)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32)
        .chain([0x3f80_8000, 0x3f81_8000, 0x3380_0000, 0x3380_0001, 0x7f7f_ffff, 0x0000_0001, 0x8000_0000])
        .chain([0x477f_f000, 0x477f_efff, 0x3880_0000, 0x387f_ffff, 0x7fc0_0001, 0xff80_0001])
        .flat_map(u32::to_le_bytes)
        .collect();
    // Every f16 and bf16 value as f32, and the midpoints around them: where rounding decides.
    for v in 0..=u16::MAX {
        let x = f16::from_bits(v).to_f32().to_bits();
        f32s.extend(
            [x, x.wrapping_add(0x1000), x.wrapping_add(0xfff), x.wrapping_add(0x1001)]
                .iter()
                .flat_map(|b| b.to_le_bytes()),
        );
    }
    for (from, input) in
        [("bf16", &every16), ("f16", &every16), ("f32", &f32s), ("f8e4m3", &every8), ("f8e5m2", &every8)]
    {
        for to in ["bf16", "f16", "f32"].into_iter().filter(|&t| t != from) {
            let got = run(&format!("{from}_{to}"), input);
            let expected = want(from, to, input);
            if let Some(i) = agree(to, &got, &expected) {
                panic!("{from} -> {to}: element {i} differs");
            }
        }
    }
}

/// A test that could not fail would prove nothing: a wrong kernel is caught.
#[test]
fn a_wrong_rounding_would_be_caught() {
    let input: Vec<u8> = [0x3f80_8001u32].iter().flat_map(|v| v.to_le_bytes()).collect();
    // Truncation gives 0x3f80; the kernel rounds up to 0x3f81, as `half` does.
    assert_eq!(run("f32_bf16", &input), 0x3f81u16.to_le_bytes());
    assert!(agree("bf16", &0x3f80u16.to_le_bytes(), &want("f32", "bf16", &input)).is_some());
}
