//! fp8 decoding against an independent implementation: `ml_dtypes`, the package JAX and
//! numpy users get float8 from (installed by the test command).

use std::process::Command;

use tensorlift::convert::{f8_e4m3fn_to_f32, f8_e5m2_to_f32};

fn reference(ty: &str) -> Vec<u32> {
    let script = format!(
        "import ml_dtypes, numpy as np; v = np.arange(256, dtype=np.uint8).view(ml_dtypes.{ty}).astype(np.float32); \
         print(' '.join(str(x) for x in v.view(np.uint32)))"
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3 with ml_dtypes (./scripts/test)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(|w| w.parse().unwrap()).collect()
}

#[test]
fn every_fp8_value_matches_ml_dtypes() {
    for (ty, decode) in [("float8_e4m3fn", f8_e4m3fn_to_f32 as fn(u8) -> f32), ("float8_e5m2", f8_e5m2_to_f32)] {
        let want = reference(ty);
        assert_eq!(want.len(), 256);
        for (b, &w) in want.iter().enumerate() {
            let got = decode(b as u8);
            let w = f32::from_bits(w);
            assert!(got.to_bits() == w.to_bits() || (got.is_nan() && w.is_nan()), "{ty} {b:#04x}: {got} vs {w}");
        }
    }
}
