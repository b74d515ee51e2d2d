//! Slices of tensors: which bytes of a stored tensor a slice needs, and where they go.
//!
//! A slice keeps a range of each leading dimension (dimensions it does not name are kept
//! whole), as `get_slice(name)[a:b, c:d]` does in the reference reader. Its bytes are
//! *runs*: contiguous pieces of the file, one per combination of indices of the dimensions
//! before the innermost partial one. A slice of the first dimension alone is one run, so
//! it is read as a plain, narrower tensor; a slice of an inner dimension reads the rows
//! that cover it and gathers the runs ([`Gather`]).
//!
//! ```
//! use tensorlift_format::TensorSlice;
//! // Columns 2..4 of a [3, 8] F32 matrix: 3 runs of 8 bytes, 32 bytes apart.
//! let s = TensorSlice::new([0..3, 2..4]);
//! let g = s.layout(&[3, 8], 32).unwrap();
//! assert_eq!((g.shape.as_slice(), g.first, g.gather.as_ref().map(|g| g.runs())), ([3, 2].as_slice(), 8, Some(3)));
//! ```

use std::ops::Range;

/// A part of a tensor: one range of indices for each leading dimension; the dimensions
/// after those given are whole.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct TensorSlice {
    ranges: Vec<Range<usize>>,
}

impl TensorSlice {
    /// A slice with `ranges[d]` of dimension `d` for each given `d`, whole dimensions after.
    pub fn new(ranges: impl IntoIterator<Item = Range<usize>>) -> Self {
        TensorSlice { ranges: ranges.into_iter().collect() }
    }

    /// Rows `range` of the first dimension (every other dimension whole): one contiguous
    /// read.
    pub fn rows(range: Range<usize>) -> Self {
        TensorSlice { ranges: vec![range] }
    }

    /// Indices `range` of dimension `dim`, every other dimension whole: `shape` is the
    /// tensor's (at least its dimensions before `dim`, each then whole). A `shape` of fewer
    /// dimensions is [`SliceError::Rank`]: the range would otherwise fall on another
    /// dimension than `dim`.
    pub fn along(shape: &[usize], dim: usize, range: Range<usize>) -> Result<Self, SliceError> {
        if shape.len() < dim {
            return Err(SliceError::Rank { given: dim + 1, dims: shape.len() });
        }
        let mut ranges: Vec<Range<usize>> = shape.iter().take(dim).map(|&n| 0..n).collect();
        ranges.push(range);
        Ok(TensorSlice { ranges })
    }

    /// The ranges given, by dimension.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Where this slice's bytes are in a tensor of `shape` whose elements are `bits` wide.
    pub fn layout(&self, shape: &[usize], bits: usize) -> Result<SliceLayout, SliceError> {
        if self.ranges.len() > shape.len() {
            return Err(SliceError::Rank { given: self.ranges.len(), dims: shape.len() });
        }
        for (dim, (r, &n)) in self.ranges.iter().zip(shape).enumerate() {
            if r.start > r.end || r.end > n {
                return Err(SliceError::OutOfRange { dim, range: r.clone(), len: n });
            }
        }
        let overflow = || SliceError::TooLarge;
        // Bit strides of each dimension, innermost last.
        let mut strides = vec![0u64; shape.len()];
        let mut acc = bits as u64;
        for d in (0..shape.len()).rev() {
            strides[d] = acc;
            acc = acc.checked_mul(shape[d] as u64).ok_or_else(overflow)?;
        }
        let out_shape: Vec<usize> =
            shape.iter().enumerate().map(|(d, &n)| self.ranges.get(d).map_or(n, |r| r.end - r.start)).collect();
        let elements = out_shape.iter().try_fold(1u64, |a, &n| a.checked_mul(n as u64)).ok_or_else(overflow)?;
        let out_bits = elements.checked_mul(bits as u64).ok_or_else(overflow)?;
        // The innermost dimension that is not whole: runs are that dimension's range.
        let partial = (0..self.ranges.len()).rev().find(|&d| self.ranges[d] != (0..shape[d]));
        let whole = |len: u64| SliceLayout { shape: out_shape.clone(), first: 0, len, gather: None };
        let Some(j) = partial else { return bytes(out_bits).map(whole) };
        if elements == 0 {
            return Ok(SliceLayout { shape: out_shape, first: 0, len: 0, gather: None });
        }
        let first_bits: u64 = (0..=j).map(|d| self.ranges[d].start as u64 * strides[d]).sum();
        let run_bits = (self.ranges[j].end - self.ranges[j].start) as u64 * strides[j];
        // The dimensions before `j`, outermost first; a dimension of one index adds only an
        // offset, and a dimension whose inner neighbour is whole merges with it.
        let mut outer: Vec<(usize, u64)> = Vec::new();
        for (r, &stride) in self.ranges[..j].iter().zip(&strides) {
            let count = r.end - r.start;
            if count == 1 {
                continue;
            }
            match outer.last_mut() {
                Some((c, s)) if *s == count as u64 * stride => {
                    *c *= count;
                    *s = stride;
                }
                _ => outer.push((count, stride)),
            }
        }
        if outer.is_empty() {
            let mut l = bytes(out_bits).map(whole)?;
            l.first = bytes(first_bits)?;
            return Ok(l);
        }
        let gather = Gather {
            run: bytes(run_bits)?,
            outer: outer.into_iter().map(|(c, s)| Ok((c, bytes(s)?))).collect::<Result<_, SliceError>>()?,
        };
        let span = gather.offset(gather.runs() - 1) + gather.run;
        Ok(SliceLayout { shape: out_shape, first: bytes(first_bits)?, len: span, gather: Some(gather) })
    }
}

fn bytes(bits: u64) -> Result<u64, SliceError> {
    if bits % 8 == 0 {
        Ok(bits / 8)
    } else {
        Err(SliceError::SubByte)
    }
}

/// Where a slice's bytes are: `len` bytes from `first` (relative to the tensor's start)
/// cover them, and `gather` says which of those bytes are the slice's, when not all are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceLayout {
    /// The slice's shape.
    pub shape: Vec<usize>,
    /// Offset of the first byte needed, from the tensor's first byte.
    pub first: u64,
    /// Bytes from `first` that cover the slice.
    pub len: u64,
    /// The runs, for a slice that is not one contiguous piece.
    pub gather: Option<Gather>,
}

/// The runs of a slice within the bytes that cover it: run `i` is `run` bytes at
/// [`offset(i)`](Self::offset), and lands at `i * run` in the slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gather {
    /// Bytes per run.
    pub run: u64,
    /// The dimensions runs step over, outermost first: (indices, byte stride).
    pub outer: Vec<(usize, u64)>,
}

impl Gather {
    /// Number of runs.
    pub fn runs(&self) -> usize {
        self.outer.iter().map(|&(c, _)| c).product()
    }

    /// Offset of run `i` from the first byte of the covering range. Increases with `i`.
    pub fn offset(&self, mut i: usize) -> u64 {
        let mut off = 0;
        for &(count, stride) in self.outer.iter().rev() {
            off += (i % count) as u64 * stride;
            i /= count;
        }
        off
    }

    /// Bytes of the slice.
    pub fn len(&self) -> u64 {
        self.run * self.runs() as u64
    }

    /// Whether the slice has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first run that ends after covering offset `at`.
    pub fn first_run_ending_after(&self, at: u64) -> usize {
        // Offsets increase with the run's index: binary search.
        let (mut lo, mut hi) = (0, self.runs());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.offset(mid) + self.run <= at {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Copies the runs out of `covering` (the bytes from the slice's first) into `out`.
    /// `out` must hold [`len`](Self::len) bytes and `covering` every run.
    pub fn gather_into(&self, covering: &[u8], out: &mut [u8]) {
        let run = self.run as usize;
        for (i, dst) in out.chunks_exact_mut(run.max(1)).enumerate().take(self.runs()) {
            let at = self.offset(i) as usize;
            dst.copy_from_slice(&covering[at..at + run]);
        }
    }
}

/// Why a slice does not fit a tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SliceError {
    /// More ranges than the tensor has dimensions.
    #[error("{given} ranges for a tensor of {dims} dimensions")]
    Rank { given: usize, dims: usize },
    /// A range outside its dimension, or reversed.
    #[error("range {range:?} of dimension {dim} is outside 0..{len}")]
    OutOfRange { dim: usize, range: Range<usize>, len: usize },
    /// The slice does not start and end on whole bytes (an element type under 8 bits).
    #[error("the slice does not fall on whole bytes")]
    SubByte,
    /// Sizes overflow.
    #[error("the slice's size overflows")]
    TooLarge,
    /// A slice of a tensor already sliced.
    #[error("the tensor is already sliced")]
    AlreadySliced,
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // One range: a slice of the first dimension.
mod tests {
    use super::*;

    /// The slice's elements, by brute force over every index of a tensor whose element `k`
    /// (row-major) holds the value `k`.
    fn brute(shape: &[usize], s: &TensorSlice) -> Vec<u32> {
        let total: usize = shape.iter().product();
        let mut out = Vec::new();
        'next: for k in 0..total {
            let mut rem = k;
            let mut idx = vec![0; shape.len()];
            for d in (0..shape.len()).rev() {
                idx[d] = rem % shape[d];
                rem /= shape[d];
            }
            for (d, r) in s.ranges().iter().enumerate() {
                if !r.contains(&idx[d]) {
                    continue 'next;
                }
            }
            out.push(k as u32);
        }
        out
    }

    fn through_layout(shape: &[usize], s: &TensorSlice) -> Vec<u32> {
        let file: Vec<u8> = (0..shape.iter().product::<usize>() as u32).flat_map(u32::to_le_bytes).collect();
        let l = s.layout(shape, 32).unwrap();
        let covering = &file[l.first as usize..(l.first + l.len) as usize];
        let bytes = match &l.gather {
            Some(g) => {
                let mut out = vec![0u8; g.len() as usize];
                g.gather_into(covering, &mut out);
                out
            }
            None => covering.to_vec(),
        };
        assert_eq!(bytes.len(), l.shape.iter().product::<usize>() * 4);
        bytes.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn every_slice_of_small_tensors_matches_brute_force() {
        for shape in [vec![5usize], vec![3, 4], vec![2, 3, 4], vec![2, 1, 3, 2]] {
            // Every combination of ranges of every prefix of dimensions.
            let mut cases: Vec<Vec<Range<usize>>> = vec![vec![]];
            let mut frontier: Vec<Vec<Range<usize>>> = vec![vec![]];
            for &n in &shape {
                let mut next = Vec::new();
                for c in &frontier {
                    for a in 0..=n {
                        for b in a..=n {
                            let mut c = c.clone();
                            c.push(a..b);
                            next.push(c);
                        }
                    }
                }
                cases.extend(next.iter().cloned());
                frontier = next;
            }
            for c in cases {
                let s = TensorSlice::new(c.clone());
                assert_eq!(through_layout(&shape, &s), brute(&shape, &s), "{shape:?} {c:?}");
            }
        }
    }

    #[test]
    fn leading_slices_are_one_run_and_inner_ones_gather() {
        let l = TensorSlice::rows(2..4).layout(&[8, 16], 16).unwrap();
        assert_eq!((l.first, l.len, l.gather), (64, 64, None));
        let l = TensorSlice::along(&[8, 16], 1, 4..12).unwrap().layout(&[8, 16], 16).unwrap();
        let g = l.gather.unwrap();
        assert_eq!((l.first, g.run, g.runs(), l.len), (8, 16, 8, 7 * 32 + 16));
        assert_eq!(g.first_run_ending_after(0), 0);
        assert_eq!(g.first_run_ending_after(16), 1);
        assert_eq!(g.first_run_ending_after(17), 1);
        assert_eq!(g.first_run_ending_after(10_000), 8);
        // A shape too short for the dimension asked for is refused, not a slice of another.
        assert_eq!(TensorSlice::along(&[], 1, 0..4), Err(SliceError::Rank { given: 2, dims: 0 }));
        assert_eq!(TensorSlice::along(&[8], 1, 0..4).unwrap().ranges(), [0..8, 0..4]);
        // Whole dimensions before the partial one merge into one stride.
        let g = TensorSlice::new([0..2, 0..3, 1..2]).layout(&[2, 3, 4], 8).unwrap().gather.unwrap();
        assert_eq!(g.outer, vec![(6, 4)]);
    }

    #[test]
    fn bad_slices_are_refused() {
        assert_eq!(TensorSlice::new([0..1, 0..1]).layout(&[4], 8), Err(SliceError::Rank { given: 2, dims: 1 }));
        assert_eq!(
            TensorSlice::rows(3..5).layout(&[4], 8),
            Err(SliceError::OutOfRange { dim: 0, range: 3..5, len: 4 })
        );
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = TensorSlice::rows(3..1);
        assert!(matches!(reversed.layout(&[4], 8), Err(SliceError::OutOfRange { .. })));
        // Four-bit elements: column 1 of 2 starts mid-byte.
        assert_eq!(TensorSlice::new([0..2, 1..2]).layout(&[2, 2], 4), Err(SliceError::SubByte));
        assert_eq!(TensorSlice::rows(0..1).layout(&[usize::MAX, 4], 64), Err(SliceError::TooLarge));
    }

    #[test]
    fn empty_slices_have_no_bytes() {
        let l = TensorSlice::new([0..4, 2..2]).layout(&[4, 4], 32).unwrap();
        assert_eq!((l.shape, l.len, l.gather), (vec![4, 0], 0, None));
    }
}
