//! The drivers every elementwise kernel runs on: the array seen as (outer, channels, inner)
//! or as groups, split into chunks over rayon's threads, each chunk dispatched to the CPU's
//! vector width.
use crate::quant::CHUNK;
use ndarray::{ArrayD, ArrayViewD, Axis};
use rayon::prelude::*;
use std::mem::MaybeUninit;

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
    pub(super) fn run_at(&self, i: usize, left: usize) -> (usize, usize, bool) {
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
pub(crate) fn advise_huge_pages<T>(s: &mut [T]) {
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
    impl<I, O, K: RunKernel<I, O>> crate::quant::simd::Kernel for Call<'_, '_, I, O, K> {
        type Output = ();
        #[inline(always)]
        fn run<S: crate::quant::simd::Isa>(self) {
            run_chunk(self.k, self.lay, self.start, self.x, self.o, self.m)
        }
    }
    crate::quant::simd::dispatch(Call {
        k,
        lay,
        start,
        x,
        o,
        m,
    })
}
