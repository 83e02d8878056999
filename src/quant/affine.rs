//! Affine quantization with ATen's exact arithmetic: `q = clamp(zp + nearbyint(x * (1/scale)))`
//! in float32 with the float32 reciprocal, rounding half to even, and `x̂ = (q - zp) * scale`.
//!
//! The edge cases (NaN, ±Inf, values beyond int64) follow what PyTorch's CPU kernels return,
//! which differs between its entry points; each kernel below says which rule it follows.
use super::elem::{Elem, Real};
use super::CHUNK;
use crate::{ensure, Result};
use ndarray::{ArrayD, ArrayViewD, Axis};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// An integer range `[min, max]` of quantized codes, validated on construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QRange {
    pub min: i32,
    pub max: i32,
}

/// Fake-quant ranges go up to 2^24 so that every integer in them is exact in float32.
const FAKE_QUANT_LIMIT: i64 = 1 << 24;

impl QRange {
    /// A range for fake-quant: `quant_min <= quant_max`, both within ±2^24.
    pub fn new(quant_min: i64, quant_max: i64) -> Result<Self> {
        ensure!(
            quant_min <= quant_max,
            "quant_min ({quant_min}) must be less than or equal to quant_max ({quant_max})"
        );
        ensure!(
            quant_min >= -FAKE_QUANT_LIMIT && quant_max <= FAKE_QUANT_LIMIT,
            "quant_min/quant_max ({quant_min}, {quant_max}) must lie within ±2^24: lowbit clamps in \
             float32, exact only there (torch also takes qint32's range)"
        );
        Ok(QRange {
            min: quant_min as i32,
            max: quant_max as i32,
        })
    }

    /// A range whose codes fit one byte: int8 when `quant_min < 0`, uint8 otherwise.
    pub fn codes(quant_min: i64, quant_max: i64) -> Result<Self> {
        let r = Self::new(quant_min, quant_max)?;
        ensure!(
            (r.min >= 0 && r.max <= 255) || (r.min >= -128 && r.max <= 127),
            "quant_min/quant_max ({quant_min}, {quant_max}) must fit int8 (-128..127) or uint8 (0..255)"
        );
        Ok(r)
    }

    /// Range of a `bits`-wide code: signed `-2^(b-1)..2^(b-1)-1` or unsigned `0..2^b-1`.
    pub fn for_bits(bits: u32, signed: bool) -> Result<Self> {
        ensure!(
            (1..=8).contains(&bits),
            "bits must be between 1 and 8, got {bits}"
        );
        let levels = 1i64 << bits;
        if signed {
            Self::codes(-levels / 2, levels / 2 - 1)
        } else {
            Self::codes(0, levels - 1)
        }
    }

    pub fn is_signed(&self) -> bool {
        self.min < 0
    }

    /// Number of bits a code of this range needs.
    pub fn bits(&self) -> u32 {
        let span = (self.max as i64 - self.min as i64) as u64;
        64 - span.leading_zeros()
    }
}

/// Validates a scale and rounds it to float32 as ATen does (`float sc = scale`).
pub fn check_scale(what: &str, scale: f64) -> Result<f32> {
    ensure!(
        scale.is_finite() && scale > 0.0,
        "{what} must be a finite positive number, got {scale}"
    );
    let s = scale as f32;
    ensure!(
        s > 0.0 && s.is_finite(),
        "{what} ({scale}) is 0 or Inf in float32, the precision the kernels (torch's too) compute \
         in: torch would return zeros or NaN"
    );
    Ok(s)
}

/// Validates a zero point against its range (PyTorch's own check).
pub fn check_zero_point(what: &str, zp: i64, r: QRange) -> Result<i32> {
    ensure!(
        zp >= r.min as i64 && zp <= r.max as i64,
        "{what} ({zp}) must be between quant_min ({}) and quant_max ({})",
        r.min,
        r.max
    );
    Ok(zp as i32)
}

/// Normalises a possibly negative axis.
pub fn check_axis(axis: i64, ndim: usize) -> Result<usize> {
    let n = ndim as i64;
    ensure!(
        ndim > 0 && axis >= -n && axis < n,
        "axis {axis} is out of range for an array with {ndim} dimensions"
    );
    Ok(if axis < 0 { axis + n } else { axis } as usize)
}

/// A byte-wide integer code type.
pub trait Code: Copy + Send + Sync + 'static {
    fn from_i32(v: i32) -> Self;
    fn to_i32(self) -> i32;
}
impl Code for i8 {
    #[inline(always)]
    fn from_i32(v: i32) -> i8 {
        v as i8
    }
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}
impl Code for u8 {
    #[inline(always)]
    fn from_i32(v: i32) -> u8 {
        v as u8
    }
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}

/// One elementwise kernel, applied to runs of elements that share a channel (`uniform`) or
/// whose channel advances by one per element (`varying`, the innermost-axis case).
pub(crate) trait RunKernel<I, O>: Sync {
    fn uniform(
        &self,
        x: &[I],
        o: &mut [MaybeUninit<O>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    );
    fn varying(
        &self,
        x: &[I],
        o: &mut [MaybeUninit<O>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    );
}

/// Shape of an array seen as `(outer, channels, inner)` around the quantization axis.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    channels: usize,
    inner: usize,
    /// `(k, g)`: groups of `g` consecutive elements of rows of length `k` (the last group of a
    /// row may be shorter); group `j` of row `r` uses channel `r * ceil(k / g) + j`.
    groups: Option<(usize, usize)>,
}

impl Layout {
    pub(crate) fn per_tensor(n: usize) -> Self {
        Layout {
            channels: 1,
            inner: n.max(1),
            groups: None,
        }
    }
    pub(crate) fn per_channel(shape: &[usize], axis: usize) -> Self {
        Layout {
            channels: shape[axis],
            inner: shape[axis + 1..].iter().product::<usize>().max(1),
            groups: None,
        }
    }
    /// Groups along the last axis of `shape` (callers check `shape` is not 0-d and `g > 0`).
    pub(crate) fn groups(shape: &[usize], g: usize) -> Self {
        let k = shape.last().copied().unwrap_or(1).max(1);
        Layout {
            channels: 0,
            inner: 0,
            groups: Some((k, g)),
        }
    }

    /// The channel of flat index `i` and how many elements from `i` on (at most `left`) share
    /// it; `varying` runs instead advance the channel by one per element (innermost axis).
    #[inline(always)]
    fn run_at(&self, i: usize, left: usize) -> (usize, usize, bool) {
        if let Some((k, g)) = self.groups {
            let (row, col) = (i / k, i % k);
            let c = row * k.div_ceil(g) + col / g;
            (c, (g - col % g).min(k - col).min(left), false)
        } else if self.inner == 1 {
            let c = i % self.channels;
            (c, (self.channels - c).min(left), true)
        } else {
            let c = (i / self.inner) % self.channels;
            (c, (self.inner - i % self.inner).min(left), false)
        }
    }
}

type MaskOut<'a> = Option<&'a mut [MaybeUninit<bool>]>;

/// Splits an optional mask into the same chunks as the output.
fn mask_chunks<'a>(mask: MaskOut<'a>, n: usize, block: usize) -> Vec<MaskOut<'a>> {
    match mask {
        Some(m) => m.chunks_mut(block).map(Some).collect(),
        None => (0..n.div_ceil(block)).map(|_| None).collect(),
    }
}

/// Runs `k` over every element of `x`, writing `out` (and `mask`, both C-contiguous with
/// `x.len()` elements) in C order. Contiguous input is split into parallel chunks; strided
/// input is read in place, in parallel blocks of its first axis gathered CHUNK elements at a time.
pub(crate) fn drive_into<I, O, K>(
    x: &ArrayViewD<'_, I>,
    lay: &Layout,
    k: &K,
    out: &mut [MaybeUninit<O>],
    mask: MaskOut<'_>,
) where
    I: Copy + Sync,
    O: Copy + Send,
    K: RunKernel<I, O>,
{
    let n = x.len();
    assert_eq!(out.len(), n, "output length checked by the caller");
    if n == 0 {
        return;
    }
    match x.as_slice() {
        Some(xs) => xs
            .par_chunks(CHUNK)
            .zip(out.par_chunks_mut(CHUNK))
            .zip(mask_chunks(mask, n, CHUNK))
            .enumerate()
            .for_each(|(i, ((x, o), m))| run_chunk_dispatch(k, lay, i * CHUNK, x, o, m)),
        None => {
            let block = n / x.shape()[0];
            x.axis_iter(Axis(0))
                .into_par_iter()
                .zip(out.par_chunks_mut(block))
                .zip(mask_chunks(mask, n, block))
                .enumerate()
                .for_each(|(i, ((sub, o), mut m))| {
                    let mut it = sub.iter().copied();
                    let mut buf = Vec::with_capacity(CHUNK.min(block));
                    let mut off = 0;
                    loop {
                        buf.clear();
                        buf.extend(it.by_ref().take(CHUNK));
                        if buf.is_empty() {
                            break;
                        }
                        let r = off..off + buf.len();
                        let mr = m.as_deref_mut().map(|m| &mut m[r.clone()]);
                        run_chunk_dispatch(k, lay, i * block + off, &buf, &mut o[r], mr);
                        off += buf.len();
                    }
                })
        }
    }
}

/// `drive_into` a freshly allocated output (and mask).
pub(crate) fn drive<I, O, K>(
    x: &ArrayViewD<'_, I>,
    lay: &Layout,
    k: &K,
    with_mask: bool,
) -> (ArrayD<O>, Option<ArrayD<bool>>)
where
    I: Copy + Sync,
    O: Copy + Send,
    K: RunKernel<I, O>,
{
    let mut out = ArrayD::<O>::uninit(x.raw_dim());
    let mut mask = with_mask.then(|| ArrayD::<bool>::uninit(x.raw_dim()));
    let os = out.as_slice_mut().expect("fresh arrays are contiguous");
    advise_huge_pages(os);
    let ms = mask
        .as_mut()
        .map(|m| m.as_slice_mut().expect("fresh arrays are contiguous"));
    drive_into(x, lay, k, os, ms);
    // SAFETY: drive_into writes every element of `out` and `mask`.
    unsafe { (out.assume_init(), mask.map(|m| m.assume_init())) }
}

/// Runs `k` over a contiguous buffer in place, staging small blocks through a cache-sized copy.
pub(crate) fn drive_in_place<E, K>(data: &mut [E], lay: &Layout, k: &K, mask: MaskOut<'_>)
where
    E: Copy + Send + Sync,
    K: RunKernel<E, E>,
{
    const STAGE: usize = 2048;
    let n = data.len();
    data.par_chunks_mut(CHUNK)
        .zip(mask_chunks(mask, n, CHUNK))
        .enumerate()
        .for_each(|(i, (d, mut m))| {
            let mut buf = Vec::with_capacity(STAGE.min(d.len()));
            for (j, sub) in d.chunks_mut(STAGE).enumerate() {
                buf.clear();
                buf.extend_from_slice(sub);
                // SAFETY: MaybeUninit<E> has E's layout; the kernel only writes initialized values.
                let o = unsafe { &mut *(sub as *mut [E] as *mut [MaybeUninit<E>]) };
                let r = j * STAGE..j * STAGE + buf.len();
                let mr = m.as_deref_mut().map(|m| &mut m[r]);
                run_chunk_dispatch(k, lay, i * CHUNK + j * STAGE, &buf, o, mr);
            }
        });
}

/// Asks Linux to back a large fresh output with transparent huge pages: first-touch page
/// faults on 4 KiB pages otherwise cost more than the kernel itself.
fn advise_huge_pages<T>(s: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, len) = (s.as_mut_ptr() as usize, std::mem::size_of_val(s));
        if len >= 2 * HUGE {
            let a = start.next_multiple_of(HUGE);
            let b = (start + len) & !(HUGE - 1);
            if b > a {
                // SAFETY: [a, b) lies inside the allocation; MADV_HUGEPAGE only changes how it is backed.
                unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
            }
        }
    }
}

/// Runs the kernel over `x`, whose first element has C-order index `start`, split into runs
/// that share a channel (or, on the innermost axis, runs of consecutive channels).
#[inline(always)]
fn run_chunk<I, O, K: RunKernel<I, O>>(
    k: &K,
    lay: &Layout,
    start: usize,
    x: &[I],
    o: &mut [MaybeUninit<O>],
    mut m: MaskOut<'_>,
) {
    let len = x.len();
    let mut off = 0;
    while off < len {
        let (c, n, varying) = lay.run_at(start + off, len - off);
        let r = off..off + n;
        let mr = m.as_deref_mut().map(|m| &mut m[r.clone()]);
        if varying {
            k.varying(&x[r.clone()], &mut o[r], mr, c);
        } else {
            k.uniform(&x[r.clone()], &mut o[r], mr, c);
        }
        off += n;
    }
}

/// `run_chunk` compiled for the best instruction set the CPU has (see `simd::dispatch`).
fn run_chunk_dispatch<I, O, K: RunKernel<I, O>>(
    k: &K,
    lay: &Layout,
    start: usize,
    x: &[I],
    o: &mut [MaybeUninit<O>],
    m: MaskOut<'_>,
) {
    struct Call<'a, 'b, I, O, K> {
        k: &'a K,
        lay: &'a Layout,
        start: usize,
        x: &'a [I],
        o: &'a mut [MaybeUninit<O>],
        m: MaskOut<'b>,
    }
    impl<I, O, K: RunKernel<I, O>> super::simd::Kernel for Call<'_, '_, I, O, K> {
        type Output = ();
        #[inline(always)]
        fn run<S: crate::quant::simd::Isa>(self) {
            run_chunk(self.k, self.lay, self.start, self.x, self.o, self.m)
        }
    }
    super::simd::dispatch(Call {
        k,
        lay,
        start,
        x,
        o,
        m,
    })
}

// ---------------------------------------------------------------------------------------------
// Fake-quant

/// Per-channel parameters in the compute type (one entry for per-tensor).
struct FakeQuant<C> {
    inv: Vec<C>,
    scale: Vec<C>,
    zp: Vec<C>,
    qmin: C,
    qmax: C,
    /// Largest `zp + round(x/s)` still clamped to `qmax`; beyond it the value goes to `qmin`.
    /// Per tensor ATen clamps in float (∞); per channel it converts to int64 first, and an
    /// overflowing conversion yields INT64_MIN, hence `qmin`.
    hi: C,
    /// ATen's per-tensor kernel multiplies `(q - zp) * scale` in float32 even for float64
    /// input; the per-channel one multiplies in the input's type.
    product_f32: bool,
}

impl<C: Real> FakeQuant<C> {
    fn new(scales: &[f32], zps: &[i32], r: QRange, hi: C, product_f32: bool) -> Self {
        FakeQuant {
            product_f32,
            inv: scales.iter().map(|&s| C::from_f32(1.0f32 / s)).collect(),
            scale: scales.iter().map(|&s| C::from_f32(s)).collect(),
            zp: zps.iter().map(|&z| C::from_i32(z)).collect(),
            qmin: C::from_i32(r.min),
            qmax: C::from_i32(r.max),
            hi,
        }
    }

    #[inline(always)]
    fn one(&self, x: C, inv: C, scale: C, zp: C) -> (C, bool) {
        let t = zp + (x * inv).rne();
        let inside = (t >= self.qmin) & (t <= self.qmax);
        // Three selects, no branch: a branch per element mispredicts whenever values clamp
        // (10x slower at int4), and these compile to maxps / minps / blendv. NaN fails
        // `t > qmin`, so it maps to qmin, as do values below the range and int64 overflows.
        let q = if t > self.qmin { t } else { self.qmin };
        let q = if q < self.qmax { q } else { self.qmax };
        let q = if t > self.hi { self.qmin } else { q };
        let out = if self.product_f32 {
            C::from_f32((q - zp).to_f32() * scale.to_f32())
        } else {
            (q - zp) * scale
        };
        (out, inside)
    }
}

impl<E: Elem> RunKernel<E, E> for FakeQuant<E::C> {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<E>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (inv, s, zp) = (self.inv[c], self.scale[c], self.zp[c]);
        match m {
            Some(m) => {
                for ((o, m), x) in o.iter_mut().zip(m.iter_mut()).zip(x) {
                    let (v, inside) = self.one(x.load(), inv, s, zp);
                    o.write(E::store(v));
                    m.write(inside);
                }
            }
            None => {
                for (o, x) in o.iter_mut().zip(x) {
                    o.write(E::store(self.one(x.load(), inv, s, zp).0));
                }
            }
        }
    }

    #[inline(always)]
    fn varying(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<E>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (inv, s, zp) = (
            &self.inv[c0..c0 + n],
            &self.scale[c0..c0 + n],
            &self.zp[c0..c0 + n],
        );
        // Equal lengths, visible to LLVM: no bounds check keeps the loop from vectorizing.
        let o = &mut o[..n];
        match m {
            Some(m) => {
                for (i, (o, m)) in o.iter_mut().zip(m[..n].iter_mut()).enumerate() {
                    let (v, inside) = self.one(x[i].load(), inv[i], s[i], zp[i]);
                    o.write(E::store(v));
                    m.write(inside);
                }
            }
            None => {
                for (i, o) in o.iter_mut().enumerate() {
                    o.write(E::store(self.one(x[i].load(), inv[i], s[i], zp[i]).0));
                }
            }
        }
    }
}

/// Output of a fake-quant kernel: the rounded values and, when asked for, the
/// straight-through mask `quant_min <= zp + round(x / scale) <= quant_max`.
pub type FakeQuantOutput<E> = (ArrayD<E>, Option<ArrayD<bool>>);

/// A validated fake-quant operation for arrays of one shape, runnable into a new array, into a
/// caller's buffer, or in place.
pub struct FakeQuantOp<C> {
    k: FakeQuant<C>,
    lay: Layout,
    shape: Vec<usize>,
}

impl<C: Real> FakeQuantOp<C> {
    /// `torch.fake_quantize_per_tensor_affine`, bit for bit: NaN maps to `quant_min`, ±Inf and
    /// out-of-range values clamp; the mask is false for all of them.
    pub fn per_tensor(
        shape: &[usize],
        scale: f64,
        zero_point: i64,
        quant_min: i64,
        quant_max: i64,
    ) -> Result<Self> {
        let r = QRange::new(quant_min, quant_max)?;
        let s = check_scale("scale", scale)?;
        let zp = check_zero_point("zero_point", zero_point, r)?;
        let n = shape.iter().product();
        Ok(FakeQuantOp {
            k: FakeQuant::new(&[s], &[zp], r, C::INFINITY, true),
            lay: Layout::per_tensor(n),
            shape: shape.to_vec(),
        })
    }

    /// `torch.fake_quantize_per_channel_affine`, bit for bit, including its int64 conversion:
    /// values whose `zp + round(x/s)` reaches 2^63 (and +Inf) map to `quant_min`, like NaN.
    pub fn per_channel(
        shape: &[usize],
        scales: &[f64],
        zero_points: &[i64],
        axis: i64,
        quant_min: i64,
        quant_max: i64,
    ) -> Result<Self> {
        let r = QRange::new(quant_min, quant_max)?;
        let axis = check_axis(axis, shape.len())?;
        let (s, zp) = channel_params(shape, axis, scales, zero_points, r)?;
        Ok(FakeQuantOp {
            k: FakeQuant::new(&s, &zp, r, C::I64_SAFE_MAX, false),
            lay: Layout::per_channel(shape, axis),
            shape: shape.to_vec(),
        })
    }

    fn check(&self, shape: &[usize], what: &str) -> Result<()> {
        ensure!(
            shape == self.shape.as_slice(),
            "{what} has shape {shape:?}, expected {:?}",
            self.shape
        );
        Ok(())
    }

    /// Fake-quantizes `x` into a new array (and mask).
    pub fn run<E: Elem<C = C>>(
        &self,
        x: ArrayViewD<'_, E>,
        with_mask: bool,
    ) -> Result<FakeQuantOutput<E>> {
        self.check(x.shape(), "x")?;
        Ok(drive(&x, &self.lay, &self.k, with_mask))
    }

    /// Fake-quantizes `x` into `out` (C order, `x.len()` elements) and optionally a mask.
    pub fn run_into<E: Elem<C = C>>(
        &self,
        x: ArrayViewD<'_, E>,
        out: &mut [E],
        mask: Option<&mut [bool]>,
    ) -> Result<()> {
        self.check(x.shape(), "x")?;
        ensure!(
            out.len() == x.len(),
            "out has {} elements, expected {}",
            out.len(),
            x.len()
        );
        // SAFETY: MaybeUninit<T> has T's layout; kernels only write initialized values.
        let o = unsafe { &mut *(out as *mut [E] as *mut [MaybeUninit<E>]) };
        let m = mask.map(|m| unsafe { &mut *(m as *mut [bool] as *mut [MaybeUninit<bool>]) });
        drive_into(&x, &self.lay, &self.k, o, m);
        Ok(())
    }

    /// Fake-quantizes a C-contiguous buffer of this op's shape in place.
    pub fn run_in_place<E: Elem<C = C>>(
        &self,
        data: &mut [E],
        mask: Option<&mut [bool]>,
    ) -> Result<()> {
        let n: usize = self.shape.iter().product();
        ensure!(
            data.len() == n,
            "the buffer has {} elements, expected {n}",
            data.len()
        );
        // SAFETY: as in run_into.
        let m = mask.map(|m| unsafe { &mut *(m as *mut [bool] as *mut [MaybeUninit<bool>]) });
        drive_in_place(data, &self.lay, &self.k, m);
        Ok(())
    }
}

/// `FakeQuantOp::per_tensor(..).run(x, with_mask)`.
pub fn fake_quantize_per_tensor<E: Elem>(
    x: ArrayViewD<'_, E>,
    scale: f64,
    zero_point: i64,
    quant_min: i64,
    quant_max: i64,
    with_mask: bool,
) -> Result<FakeQuantOutput<E>> {
    FakeQuantOp::<E::C>::per_tensor(x.shape(), scale, zero_point, quant_min, quant_max)?
        .run(x, with_mask)
}

/// `FakeQuantOp::per_channel(..).run(x, with_mask)`.
pub fn fake_quantize_per_channel<E: Elem>(
    x: ArrayViewD<'_, E>,
    scales: &[f64],
    zero_points: &[i64],
    axis: i64,
    quant_min: i64,
    quant_max: i64,
    with_mask: bool,
) -> Result<FakeQuantOutput<E>> {
    FakeQuantOp::<E::C>::per_channel(x.shape(), scales, zero_points, axis, quant_min, quant_max)?
        .run(x, with_mask)
}

/// Validates per-channel scales and zero points against the array's channel count.
pub(crate) fn channel_params(
    shape: &[usize],
    axis: usize,
    scales: &[f64],
    zero_points: &[i64],
    r: QRange,
) -> Result<(Vec<f32>, Vec<i32>)> {
    let c = shape[axis];
    ensure!(
        scales.len() == c,
        "scales has {} entries but axis {axis} of shape {shape:?} has {c}",
        scales.len()
    );
    ensure!(
        zero_points.len() == c,
        "zero_points has {} entries but axis {axis} of shape {shape:?} has {c}",
        zero_points.len()
    );
    // Names are formatted only for the error: there can be millions of groups.
    let s = scales
        .iter()
        .enumerate()
        .map(|(i, &v)| check_scale("", v).or_else(|_| check_scale(&format!("scales[{i}]"), v)))
        .collect::<Result<Vec<_>>>()?;
    let z = zero_points
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            check_zero_point("", v, r)
                .or_else(|_| check_zero_point(&format!("zero_points[{i}]"), v, r))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((s, z))
}

// ---------------------------------------------------------------------------------------------
// Quantize to integer codes

/// Per tensor, PyTorch quantizes with FBGEMM's vector rule: `x * inv` is capped at
/// 2147483520 (NaN becomes the cap too), converted to int32, and the zero point is added
/// with int32 wrap-around before the clamp.
struct QuantTensor {
    inv: f32,
    zp: i32,
    r: QRange,
}

/// Per channel, PyTorch uses the scalar rule: `zp + nearbyint(x * inv)` in float, clamped; NaN
/// converts to the raw code 0.
pub(crate) struct QuantChannel {
    inv: Vec<f32>,
    zp: Vec<f32>,
    r: QRange,
    /// Subtracted from every code: `quant_min` gives the unsigned offsets that get packed.
    offset: i32,
}

const FBGEMM_CAP: f32 = 2_147_483_520.0; // largest float32 below i32::MAX

impl QuantTensor {
    #[inline(always)]
    fn one(&self, x: f32) -> i32 {
        let t = x * self.inv;
        let t = if t <= FBGEMM_CAP { t } else { FBGEMM_CAP };
        // Below -2^31 the conversion gives i32::MIN, like cvtps2dq's "integer indefinite".
        let t = t.rne().max(-2_147_483_648.0);
        // SAFETY: t is finite and within [-2^31, 2^31 - 128].
        let v: i32 = unsafe { t.to_int_unchecked() };
        v.wrapping_add(self.zp).clamp(self.r.min, self.r.max)
    }
}

impl QuantChannel {
    pub(crate) fn new(scales: &[f32], zps: &[i32], r: QRange) -> Self {
        QuantChannel {
            inv: scales.iter().map(|&s| 1.0 / s).collect(),
            zp: zps.iter().map(|&z| z as f32).collect(),
            r,
            offset: 0,
        }
    }

    /// The same kernel writing `code - quant_min`.
    pub(crate) fn offsets(mut self) -> Self {
        self.offset = self.r.min;
        self
    }

    #[inline(always)]
    fn one(&self, x: f32, inv: f32, zp: f32) -> i32 {
        let t = zp + (x * inv).rne();
        let (lo, hi) = (self.r.min as f32, self.r.max as f32);
        // NaN converts to the raw code 0 before the clamp. (f32::clamp's assert would keep
        // this loop from vectorizing, hence max/min.)
        let t = if t.is_nan() { 0.0 } else { t };
        let t = t.max(lo).min(hi);
        // SAFETY: t is an integer-valued float within the i32 range [lo, hi].
        let q: i32 = unsafe { t.to_int_unchecked() };
        q - self.offset
    }
}

impl<E: Elem, Q: Code> RunKernel<E, Q> for QuantTensor {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        _: Option<&mut [MaybeUninit<bool>]>,
        _: usize,
    ) {
        for (o, x) in o.iter_mut().zip(x) {
            o.write(Q::from_i32(self.one(x.to_f32())));
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        <Self as RunKernel<E, Q>>::uniform(self, x, o, m, c0)
    }
}

impl<E: Elem, Q: Code> RunKernel<E, Q> for QuantChannel {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (inv, zp) = (self.inv[c], self.zp[c]);
        for (o, x) in o.iter_mut().zip(x) {
            o.write(Q::from_i32(self.one(x.to_f32(), inv, zp)));
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (inv, zp) = (&self.inv[c0..c0 + n], &self.zp[c0..c0 + n]);
        for (i, o) in o[..n].iter_mut().enumerate() {
            o.write(Q::from_i32(self.one(x[i].to_f32(), inv[i], zp[i])));
        }
    }
}

/// Integer codes of an array, either int8 or uint8 depending on the range.
#[derive(Clone, Debug, PartialEq)]
pub enum Codes {
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
}

/// `torch.quantize_per_tensor(x, scale, zp, dtype).int_repr()` clamped to `[quant_min, quant_max]`;
/// int8 codes when `quant_min < 0`, uint8 otherwise. Input is rounded to float32 first.
pub fn quantize_per_tensor<E: Elem>(
    x: ArrayViewD<'_, E>,
    scale: f64,
    zero_point: i64,
    quant_min: i64,
    quant_max: i64,
) -> Result<Codes> {
    let r = QRange::codes(quant_min, quant_max)?;
    let s = check_scale("scale", scale)?;
    let zp = check_zero_point("zero_point", zero_point, r)?;
    let k = QuantTensor {
        inv: 1.0 / s,
        zp,
        r,
    };
    let lay = Layout::per_tensor(x.len());
    Ok(if r.is_signed() {
        Codes::I8(drive(&x, &lay, &k, false).0)
    } else {
        Codes::U8(drive(&x, &lay, &k, false).0)
    })
}

/// `torch.quantize_per_channel(...).int_repr()` clamped to `[quant_min, quant_max]`.
pub fn quantize_per_channel<E: Elem>(
    x: ArrayViewD<'_, E>,
    scales: &[f64],
    zero_points: &[i64],
    axis: i64,
    quant_min: i64,
    quant_max: i64,
) -> Result<Codes> {
    let r = QRange::codes(quant_min, quant_max)?;
    let axis = check_axis(axis, x.ndim())?;
    let (s, zp) = channel_params(x.shape(), axis, scales, zero_points, r)?;
    let k = QuantChannel::new(&s, &zp, r);
    let lay = Layout::per_channel(x.shape(), axis);
    Ok(if r.is_signed() {
        Codes::I8(drive(&x, &lay, &k, false).0)
    } else {
        Codes::U8(drive(&x, &lay, &k, false).0)
    })
}

// ---------------------------------------------------------------------------------------------
// Dequantize

pub(crate) struct Dequant {
    pub(crate) scale: Vec<f32>,
    pub(crate) zp: Vec<i32>,
}

impl<Q: Code> RunKernel<Q, f32> for Dequant {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (s, zp) = (self.scale[c], self.zp[c]);
        for (o, x) in o.iter_mut().zip(x) {
            o.write((x.to_i32() - zp) as f32 * s);
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (s, zp) = (&self.scale[c0..c0 + n], &self.zp[c0..c0 + n]);
        for (i, o) in o[..n].iter_mut().enumerate() {
            o.write((x[i].to_i32() - zp[i]) as f32 * s[i]);
        }
    }
}

/// `(q - zero_point) * scale` in float32, as `torch.dequantize` computes it.
pub fn dequantize_per_tensor<Q: Code>(
    q: ArrayViewD<'_, Q>,
    scale: f64,
    zero_point: i64,
) -> Result<ArrayD<f32>> {
    let s = check_scale("scale", scale)?;
    ensure!(
        (i32::MIN as i64..=i32::MAX as i64).contains(&zero_point),
        "zero_point ({zero_point}) does not fit int32"
    );
    let k = Dequant {
        scale: vec![s],
        zp: vec![zero_point as i32],
    };
    Ok(drive(&q, &Layout::per_tensor(q.len()), &k, false).0)
}

/// Per-channel `(q - zero_points[c]) * scales[c]` along `axis`.
pub fn dequantize_per_channel<Q: Code>(
    q: ArrayViewD<'_, Q>,
    scales: &[f64],
    zero_points: &[i64],
    axis: i64,
) -> Result<ArrayD<f32>> {
    let axis = check_axis(axis, q.ndim())?;
    let wide = QRange {
        min: i32::MIN,
        max: i32::MAX,
    };
    let (_, zp) = channel_params(q.shape(), axis, scales, zero_points, wide)?;
    let k = DequantF64 {
        scale: scales.to_vec(),
        zp,
    };
    Ok(drive(&q, &Layout::per_channel(q.shape(), axis), &k, false).0)
}

/// Per-channel dequantization as ATen's per-channel kernel computes it: `(q - zp)` in float32
/// times the float64 scale, rounded once to float32 (per-tensor `torch.dequantize` multiplies
/// by the scale rounded to float32 instead: `Dequant`).
struct DequantF64 {
    scale: Vec<f64>,
    zp: Vec<i32>,
}

impl<Q: Code> RunKernel<Q, f32> for DequantF64 {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (s, zp) = (self.scale[c], self.zp[c]);
        for (o, x) in o.iter_mut().zip(x) {
            o.write(((x.to_i32() - zp) as f32 as f64 * s) as f32);
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (s, zp) = (&self.scale[c0..c0 + n], &self.zp[c0..c0 + n]);
        for (i, o) in o[..n].iter_mut().enumerate() {
            o.write(((x[i].to_i32() - zp[i]) as f32 as f64 * s[i]) as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, Array2, ArrayD, IxDyn};

    /// ATen's scalar loop, written out the way the C++ does it (int64 conversion included).
    fn aten_fq(x: f32, s: f32, zp: i64, qmin: i64, qmax: i64, per_channel: bool) -> f32 {
        let inv = 1.0f32 / s;
        let t = zp as f32 + (x * inv).round_ties_even();
        let q = if t.is_nan() || (per_channel && t >= 9.223_372e18) {
            qmin
        } else {
            (t.clamp(qmin as f32, qmax as f32)) as i64
        };
        ((q - zp) as f64 * s as f64) as f32
    }

    #[test]
    fn per_tensor_matches_reference_on_ties_and_specials() {
        let s = 0.1f32;
        let mut xs: Vec<f32> = (-300..300).map(|i| (i as f32 + 0.5) * s).collect();
        xs.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            0.0,
            -0.0,
            1e-45,
        ]);
        let x = arr1(&xs).into_dyn();
        for (qmin, qmax, zp) in [
            (-2, 1, 0),
            (0, 3, 1),
            (-8, 7, 0),
            (0, 15, 3),
            (-128, 127, -5),
            (0, 255, 128),
        ] {
            let (out, mask) =
                fake_quantize_per_tensor(x.view(), s as f64, zp, qmin, qmax, true).unwrap();
            let mask = mask.unwrap();
            for (i, &v) in xs.iter().enumerate() {
                let want = aten_fq(v, s, zp, qmin, qmax, false);
                assert_eq!(
                    out[i].to_bits(),
                    want.to_bits(),
                    "x={v} range {qmin}..{qmax}"
                );
                let t = zp as f32 + (v / s).round_ties_even();
                let _ = t;
                let tq = zp as f32 + (v * (1.0 / s)).round_ties_even();
                assert_eq!(mask[i], tq >= qmin as f32 && tq <= qmax as f32);
            }
        }
    }

    #[test]
    fn per_channel_every_axis_and_strided_input() {
        let shape = [3usize, 4, 5];
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 18.0)
            .collect();
        let x = ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap();
        for axis in 0..3 {
            let c = shape[axis];
            let scales: Vec<f64> = (0..c).map(|i| 0.05 + 0.1 * i as f64).collect();
            let zps: Vec<i64> = (0..c).map(|i| i as i64).collect();
            let (out, _) =
                fake_quantize_per_channel(x.view(), &scales, &zps, axis as i64, 0, 15, false)
                    .unwrap();
            // The strided path (a transposed view) must agree with the contiguous one.
            let xt = x.view().reversed_axes();
            let (out_t, _) =
                fake_quantize_per_channel(xt, &scales, &zps, (2 - axis) as i64, 0, 15, false)
                    .unwrap();
            for (idx, &v) in x.indexed_iter() {
                let ch = idx[axis];
                let want = aten_fq(v, scales[ch] as f32, zps[ch], 0, 15, true);
                assert_eq!(out[&idx].to_bits(), want.to_bits());
                let ti = IxDyn(&[idx[2], idx[1], idx[0]]);
                assert_eq!(out_t[&ti].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn large_input_crosses_chunks() {
        let n = CHUNK * 3 + 17;
        let x: Vec<f32> = (0..n).map(|i| (i as f32).sin() * 3.0).collect();
        let xa = ArrayD::from_shape_vec(IxDyn(&[n]), x.clone()).unwrap();
        let (out, _) = fake_quantize_per_tensor(xa.view(), 0.02, 3, -8, 7, false).unwrap();
        for i in 0..n {
            assert_eq!(
                out[i].to_bits(),
                aten_fq(x[i], 0.02, 3, -8, 7, false).to_bits()
            );
        }
        // innermost-axis per channel with a row length that does not divide the chunk
        let cols = 1000;
        let rows = n / cols;
        let m = Array2::from_shape_vec((rows, cols), x[..rows * cols].to_vec())
            .unwrap()
            .into_dyn();
        let scales: Vec<f64> = (0..cols).map(|i| 0.01 + i as f64 * 1e-4).collect();
        let zps = vec![0i64; cols];
        let (out, _) = fake_quantize_per_channel(m.view(), &scales, &zps, 1, -8, 7, false).unwrap();
        for ((r, c), &v) in m
            .clone()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
            .indexed_iter()
        {
            let want = aten_fq(v, scales[c] as f32, 0, -8, 7, true);
            assert_eq!(out[[r, c]].to_bits(), want.to_bits());
        }
    }

    #[test]
    fn quantize_codes_follow_torch_edge_rules() {
        let x = arr1(&[
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            3e9,
            2.5,
            -0.5,
        ])
        .into_dyn();
        let Codes::U8(q) = quantize_per_tensor(x.view(), 1.0, 3, 0, 255).unwrap() else {
            panic!()
        };
        assert_eq!(q.as_slice().unwrap(), &[255, 255, 0, 255, 255, 5, 3]);
        let Codes::U8(q) = quantize_per_tensor(x.view(), 1.0, 200, 0, 255).unwrap() else {
            panic!()
        };
        assert_eq!(q.as_slice().unwrap(), &[0, 0, 0, 0, 0, 202, 200]); // FBGEMM's int32 wrap-around
        let x2 = x.clone().into_shape_with_order(IxDyn(&[1, 7])).unwrap();
        let Codes::I8(q) = quantize_per_channel(x2.view(), &[1.0], &[0], 0, -128, 127).unwrap()
        else {
            panic!()
        };
        assert_eq!(q.as_slice().unwrap(), &[0, 127, -128, 127, 127, 2, 0]);
    }

    #[test]
    fn dequantize_inverts_quantize_within_half_a_step() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.731).cos() * 2.0).collect();
        let xa = ArrayD::from_shape_vec(IxDyn(&[10, 100]), x.clone()).unwrap();
        let Codes::I8(q) = quantize_per_tensor(xa.view(), 2.0 / 127.0, 0, -128, 127).unwrap()
        else {
            panic!()
        };
        let d = dequantize_per_tensor(q.view(), 2.0 / 127.0, 0).unwrap();
        for (a, b) in d.iter().zip(&x) {
            assert!((a - b).abs() <= 0.5 * 2.0 / 127.0 + 1e-6);
        }
    }

    #[test]
    fn into_and_in_place_agree_with_a_fresh_output() {
        let n = CHUNK * 2 + 333;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let xa = ArrayD::from_shape_vec(IxDyn(&[n / 3, 3]), x[..n / 3 * 3].to_vec()).unwrap();
        for op in [
            FakeQuantOp::<f32>::per_tensor(xa.shape(), 0.03, 1, -8, 7).unwrap(),
            FakeQuantOp::<f32>::per_channel(xa.shape(), &[0.01, 0.02, 0.05], &[0, 1, -1], 1, -8, 7)
                .unwrap(),
        ] {
            let (want, mask) = op.run(xa.view(), true).unwrap();
            let mut out = vec![0f32; xa.len()];
            let mut m = vec![false; xa.len()];
            op.run_into(xa.view(), &mut out, Some(&mut m)).unwrap();
            assert_eq!(out.as_slice(), want.as_slice().unwrap());
            assert_eq!(m.as_slice(), mask.unwrap().as_slice().unwrap());
            let mut inplace = xa.as_slice().unwrap().to_vec();
            op.run_in_place(&mut inplace, None).unwrap();
            assert_eq!(inplace.as_slice(), want.as_slice().unwrap());
            assert!(op.run_into(xa.view(), &mut out[1..], None).is_err());
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let x = arr1(&[1.0f32]).into_dyn();
        assert!(fake_quantize_per_tensor(x.view(), 0.0, 0, 0, 15, false).is_err());
        assert!(fake_quantize_per_tensor(x.view(), f64::NAN, 0, 0, 15, false).is_err());
        assert!(fake_quantize_per_tensor(x.view(), 1.0, 16, 0, 15, false).is_err());
        assert!(fake_quantize_per_tensor(x.view(), 1.0, 0, 5, 3, false).is_err());
        assert!(
            fake_quantize_per_channel(x.view(), &[1.0, 2.0], &[0, 0], 0, 0, 15, false).is_err()
        );
        assert!(fake_quantize_per_channel(x.view(), &[1.0], &[0], 1, 0, 15, false).is_err());
        assert!(quantize_per_tensor(x.view(), 1.0, 0, -1, 255).is_err());
        assert!(QRange::for_bits(9, true).is_err());
    }
}
