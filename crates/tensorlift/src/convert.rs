//! Element type conversion on the host: bf16, f16, f32, f8 e4m3 (fn) and f8 e5m2 into
//! bf16, f16 or f32.
//!
//! Every source value is exactly representable in f32, so a conversion is one decode to f32
//! (exact) and one rounding to the target, to nearest, ties to even: NaN stays NaN (sign
//! kept), infinities stay infinite, subnormals are kept where the target can hold them.
//! Elements go through f32 in blocks, each loop over one pair of types so that the compiler
//! vectorizes it; f16 uses `half`'s slice conversions (F16C where the CPU has it).
//!
//! Loads apply it with `LoaderBuilder::convert_to`: here on the host, and on a CUDA device
//! by the kernels of `kernels/convert.cu`, which compute the same bits.
//!
//! ```
//! use tensorlift::{convert, Dtype};
//! let src: Vec<u8> = [1.5f32, -0.1].iter().flat_map(|v| v.to_le_bytes()).collect();
//! let mut dst = vec![0u8; 4];
//! convert::convert(Dtype::F32, Dtype::BF16, &src, &mut dst)?;
//! assert_eq!(half::bf16::from_le_bytes([dst[0], dst[1]]).to_f32(), 1.5);
//! # Ok::<(), tensorlift::convert::ConvertError>(())
//! ```

use half::f16;
use tensorlift_format::Dtype;

/// Why a conversion was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The pair of types is not one this module converts.
    #[error("no conversion from {from} to {to} (sources: BF16, F16, F32, F8_E4M3, F8_E5M2; targets: BF16, F16, F32)")]
    Unsupported { from: Dtype, to: Dtype },
    /// The buffers do not hold the same number of elements.
    #[error("{src} bytes of {from} do not make {dst} bytes of {to}")]
    Length { from: Dtype, to: Dtype, src: usize, dst: usize },
}

/// Bytes per element of the types this module handles.
fn width(d: Dtype) -> Option<usize> {
    match d {
        Dtype::F8_E4M3 | Dtype::F8_E5M2 => Some(1),
        Dtype::BF16 | Dtype::F16 => Some(2),
        Dtype::F32 => Some(4),
        _ => None,
    }
}

/// Whether `from` converts to `to`.
pub fn can_convert(from: Dtype, to: Dtype) -> bool {
    width(from).is_some() && matches!(to, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// Converts the little-endian elements of `src` (of type `from`) into `dst` (of type `to`).
pub fn convert(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<(), ConvertError> {
    let (Some(wf), Some(wt)) = (width(from), width(to)) else { return Err(ConvertError::Unsupported { from, to }) };
    if !can_convert(from, to) {
        return Err(ConvertError::Unsupported { from, to });
    }
    if src.len() % wf != 0 || src.len() / wf * wt != dst.len() {
        return Err(ConvertError::Length { from, to, src: src.len(), dst: dst.len() });
    }
    if from == to {
        // The same type: the bytes as they are (NaN payloads included).
        dst.copy_from_slice(src);
        return Ok(());
    }
    // A large tensor is cut into parts that this thread and helpers take from a list: the
    // work (and the page faults of fresh output memory) spreads over the CPUs, and a helper
    // that cannot be had leaves its share to the others.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS);
    if threads < 2 || src.len().max(dst.len()) < PARALLEL_BYTES {
        run(from, to, src, dst);
        return Ok(());
    }
    let per = (src.len() / wf).div_ceil(threads * 4).next_multiple_of(BLOCK);
    let parts: std::sync::Mutex<Vec<(&[u8], &mut [u8])>> =
        std::sync::Mutex::new(src.chunks(per * wf).zip(dst.chunks_mut(per * wt)).collect());
    let work = || loop {
        let part = parts.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let Some((s, d)) = part else { break };
        run(from, to, s, d);
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            if std::thread::Builder::new().name("tensorlift-convert".into()).spawn_scoped(scope, work).is_err() {
                break;
            }
        }
        work();
    });
    Ok(())
}

/// Tensors at least this large are converted on several threads.
const PARALLEL_BYTES: usize = 8 << 20;
/// The most threads one conversion uses.
const MAX_THREADS: usize = 8;

/// Converts on this thread. Blocks of elements go through f32: each loop below is over one
/// pair of types, plain enough for the compiler to vectorize, and f16 uses `half`'s slice
/// conversions (F16C where the CPU has it).
fn run(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) {
    let (wf, wt) = (from.bitsize() / 8, to.bitsize() / 8);
    let mut wide = [0f32; BLOCK];
    for (s, d) in src.chunks(BLOCK * wf).zip(dst.chunks_mut(BLOCK * wt)) {
        let block = &mut wide[..s.len() / wf];
        decode(from, s, block);
        encode(to, block, d);
    }
}

/// Elements converted at a time.
const BLOCK: usize = 1024;

/// `src`'s elements of type `from`, exactly, as f32.
fn decode(from: Dtype, src: &[u8], out: &mut [f32]) {
    match from {
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        Dtype::F16 => {
            let mut halves = [f16::ZERO; BLOCK];
            let halves = &mut halves[..out.len()];
            for (h, c) in halves.iter_mut().zip(src.chunks_exact(2)) {
                *h = f16::from_le_bytes([c[0], c[1]]);
            }
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(&*halves, out);
        }
        Dtype::F8_E4M3 => {
            let table = fp8_table(Fp8::E4M3);
            for (o, &b) in out.iter_mut().zip(src) {
                *o = table[usize::from(b)];
            }
        }
        Dtype::F8_E5M2 => {
            let table = fp8_table(Fp8::E5M2);
            for (o, &b) in out.iter_mut().zip(src) {
                *o = table[usize::from(b)];
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// `values` rounded to `to` (to nearest, ties to even), into `dst`.
fn encode(to: Dtype, values: &[f32], dst: &mut [u8]) {
    match to {
        Dtype::F32 => {
            for (v, d) in values.iter().zip(dst.chunks_exact_mut(4)) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (v, d) in values.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        _ => {
            let mut halves = [f16::ZERO; BLOCK];
            let halves = &mut halves[..values.len()];
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(halves, values);
            for (h, d) in halves.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&h.to_le_bytes());
            }
        }
    }
}

/// `half`'s `bf16::from_f32`, without branches: NaN keeps its sign and top mantissa bits
/// with the quiet bit set; anything else rounds to nearest, ties to even (adding `0x7fff`
/// plus the kept part's lowest bit carries exactly when the dropped half is over a half,
/// or a half with an odd kept part).
#[inline]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let nan = ((x >> 16) | 0x0040) as u16;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

#[derive(Clone, Copy)]
enum Fp8 {
    E4M3,
    E5M2,
}

/// Every value of an fp8 type, as f32, computed once.
fn fp8_table(kind: Fp8) -> &'static [f32; 256] {
    static E4M3: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    static E5M2: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    let (cell, f): (_, fn(u8) -> f32) = match kind {
        Fp8::E4M3 => (&E4M3, f8_e4m3fn_to_f32),
        Fp8::E5M2 => (&E5M2, f8_e5m2_to_f32),
    };
    cell.get_or_init(|| std::array::from_fn(|i| f(i as u8)))
}

/// float8 e4m3fn (OCP FP8, as `torch.float8_e4m3fn`): bias 7, no infinities, NaN is
/// `S.1111.111`, subnormals `m/8 * 2^-6`.
pub fn f8_e4m3fn_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0xf);
    let man = f32::from(b & 0x7);
    if exp == 0xf && b & 0x7 == 0x7 {
        return f32::from_bits(0x7fc0_0000 | (u32::from(b & 0x80) << 24));
    }
    if exp == 0 {
        return sign * man / 8.0 * 2f32.powi(-6);
    }
    sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
}

/// float8 e5m2 (OCP FP8, as `torch.float8_e5m2`): bias 15, IEEE-like infinities and NaNs,
/// subnormals `m/4 * 2^-14`.
pub fn f8_e5m2_to_f32(b: u8) -> f32 {
    // e5m2 is the top byte of an f16.
    f16::from_bits(u16::from(b) << 8).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan() && a.is_sign_negative() == b.is_sign_negative())
    }

    fn one(from: Dtype, to: Dtype, src: &[u8]) -> Vec<u8> {
        let mut dst = vec![0u8; src.len() / width(from).unwrap() * width(to).unwrap()];
        convert(from, to, src, &mut dst).unwrap();
        dst
    }

    #[test]
    fn every_16_bit_input_against_half() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
        for from in [Dtype::BF16, Dtype::F16] {
            let as_f32 =
                |v: u16| if from == Dtype::BF16 { bf16::from_bits(v).to_f32() } else { f16::from_bits(v).to_f32() };
            let f32s = one(from, Dtype::F32, &bytes);
            let bf = one(from, Dtype::BF16, &bytes);
            let hf = one(from, Dtype::F16, &bytes);
            for (i, &v) in all.iter().enumerate() {
                let x = as_f32(v);
                let got = f32::from_le_bytes(f32s[4 * i..4 * i + 4].try_into().unwrap());
                assert!(same(got, x), "{from} {v:#06x} -> F32");
                let got_bf = bf16::from_le_bytes([bf[2 * i], bf[2 * i + 1]]);
                assert!(same(got_bf.to_f32(), bf16::from_f32(x).to_f32()), "{from} {v:#06x} -> BF16");
                let got_hf = f16::from_le_bytes([hf[2 * i], hf[2 * i + 1]]);
                assert!(same(got_hf.to_f32(), f16::from_f32(x).to_f32()), "{from} {v:#06x} -> F16");
            }
        }
        // Same type: the identity, bit for bit (NaN payloads too).
        assert!(one(Dtype::BF16, Dtype::BF16, &bytes) == bytes);
        assert!(one(Dtype::F16, Dtype::F16, &bytes) == bytes);
    }

    #[test]
    fn f32_rounds_to_nearest_even() {
        // Halfway between two bf16 values: ties go to the even mantissa.
        let tie_down = f32::from_bits(0x3f80_8000); // 1 + 2^-8: between 1.0 and 1 + 2^-7
        let tie_up = f32::from_bits(0x3f81_8000); // between 1 + 2^-7 and 1 + 2^-6
        let src: Vec<u8> =
            [tie_down, tie_up, f32::INFINITY, -0.0, f32::NAN, 1e-40].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf = one(Dtype::F32, Dtype::BF16, &src);
        let got: Vec<u16> = bf.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(&got[..4], &[0x3f80, 0x3f82, 0x7f80, 0x8000]);
        assert!(bf16::from_bits(got[4]).is_nan());
        // A subnormal f32 stays a (bf16) subnormal, not zero.
        assert!(got[5] != 0 && got[5] & 0x7f80 == 0);
    }

    #[test]
    fn every_8_bit_input() {
        let all: Vec<u8> = (0..=u8::MAX).collect();
        for from in [Dtype::F8_E4M3, Dtype::F8_E5M2] {
            let f32s = one(from, Dtype::F32, &all);
            let bf = one(from, Dtype::BF16, &all);
            let hf = one(from, Dtype::F16, &all);
            for (i, &b) in all.iter().enumerate() {
                let x = f32::from_le_bytes(f32s[4 * i..4 * i + 4].try_into().unwrap());
                // fp8 values are exact in bf16 and f16: no rounding at all.
                assert!(same(bf16::from_le_bytes([bf[2 * i], bf[2 * i + 1]]).to_f32(), x), "{from} {b:#04x} -> BF16");
                assert!(same(f16::from_le_bytes([hf[2 * i], hf[2 * i + 1]]).to_f32(), x), "{from} {b:#04x} -> F16");
            }
        }
        // Known points of the formats.
        assert_eq!(f8_e4m3fn_to_f32(0x7e), 448.0);
        assert_eq!(f8_e4m3fn_to_f32(0x01), 2f32.powi(-9));
        assert!(f8_e4m3fn_to_f32(0x7f).is_nan() && f8_e4m3fn_to_f32(0xff).is_sign_negative());
        assert_eq!(f8_e4m3fn_to_f32(0x38), 1.0);
        assert_eq!(f8_e5m2_to_f32(0x7b), 57344.0);
        assert_eq!(f8_e5m2_to_f32(0x7c), f32::INFINITY);
        assert_eq!(f8_e5m2_to_f32(0x01), 2f32.powi(-16));
        assert!(f8_e5m2_to_f32(0x7d).is_nan());
    }

    #[test]
    fn large_tensors_convert_on_several_threads_to_the_same_bytes() {
        // Over PARALLEL_BYTES, with an odd element count: parts end mid-block.
        let n = (PARALLEL_BYTES / 4) * 3 + 1001;
        let src: Vec<u8> = (0..n as u32).flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes()).collect();
        for to in [Dtype::BF16, Dtype::F16] {
            let mut parallel = vec![0u8; n * 2];
            convert(Dtype::F32, to, &src, &mut parallel).unwrap();
            let mut serial = vec![0u8; n * 2];
            run(Dtype::F32, to, &src, &mut serial);
            assert!(parallel == serial, "{to}");
        }
    }

    #[test]
    fn refusals() {
        assert!(matches!(convert(Dtype::I32, Dtype::F32, &[0; 4], &mut [0; 4]), Err(ConvertError::Unsupported { .. })));
        assert!(matches!(
            convert(Dtype::F32, Dtype::F8_E4M3, &[0; 4], &mut [0; 1]),
            Err(ConvertError::Unsupported { .. })
        ));
        assert!(matches!(convert(Dtype::F32, Dtype::BF16, &[0; 4], &mut [0; 4]), Err(ConvertError::Length { .. })));
        assert!(matches!(convert(Dtype::F16, Dtype::F32, &[0; 3], &mut [0; 4]), Err(ConvertError::Length { .. })));
    }
}
