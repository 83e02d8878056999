//! Float32 sums in the order ATen's CPU `sum` / `mean` adds them, so that BitNet's absmean scale
//! (`1 / w.abs().mean()`) equals torch's to the last bit: a correctly rounded mean differs from
//! torch's in 20-70% of Gaussian weights, and a weight on a rounding boundary then flips code.
//!
//! ATen's cascade sum (aten/src/ATen/native/cpu/SumKernel.cpp) adds a contiguous run as
//! vectors of `lanes` floats (8 on AVX2 / default builds, 16 on AVX-512), four vectors
//! interleaved, each lane summed in a four-level cascade of 16-element (or longer) chunks; the
//! leftover elements are added first, then the lanes in order. A full reduction of at least
//! 32768 elements on `threads > 1` splits into OpenMP chunks, each summed that way, and sums
//! the per-thread partials. Each step here is the same float32 operation in the same order.
use std::ops::Add;

/// How torch would add: its vector width and thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumOrder {
    /// `Vectorized<float>::size()` of the kernel that runs: 8 (16 for a kernel built for AVX-512).
    pub lanes: usize,
    /// `torch.get_num_threads()`.
    pub threads: usize,
}

impl Default for SumOrder {
    /// One thread, 8 lanes: ATen registers its sum kernel for AVX2 and below only
    /// (`REGISTER_DISPATCH`), so an AVX-512 build adds in 256-bit vectors too, as NEON builds do.
    fn default() -> Self {
        SumOrder {
            lanes: 8,
            threads: 1,
        }
    }
}

/// ATen's `at::internal::GRAIN_SIZE`: smaller reductions never split over threads.
const GRAIN: usize = 32768;

/// One SIMD register of float32 lanes, added lane by lane.
#[derive(Clone, Copy)]
struct V<const L: usize>([f32; L]);

impl<const L: usize> Add for V<L> {
    type Output = Self;
    #[inline(always)]
    fn add(mut self, o: Self) -> Self {
        for i in 0..L {
            self.0[i] += o.0[i];
        }
        self
    }
}

trait Zero: Copy + Add<Output = Self> {
    const ZERO: Self;
}
impl Zero for f32 {
    const ZERO: Self = 0.0;
}
impl<const L: usize> Zero for V<L> {
    const ZERO: Self = V([0.0; L]);
}

/// `utils::CeilLog2`: 1 for x <= 2.
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// `multi_row_sum`: `R` interleaved sums over `size` steps, each a four-level cascade.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // acc[j][k] and acc[j - 1][k] side by side, as in ATen
fn multi_row_sum<T: Zero, const R: usize>(size: usize, load: impl Fn(usize, usize) -> T) -> [T; R] {
    const LEVELS: u32 = 4;
    let power = 4.max(ceil_log2(size) / LEVELS);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[T::ZERO; R]; LEVELS as usize];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = *a + load(i, k);
            }
            i += 1;
        }
        for j in 1..LEVELS as usize {
            for k in 0..R {
                acc[j][k] = acc[j][k] + acc[j - 1][k];
                acc[j - 1][k] = T::ZERO;
            }
            if i & (mask << (j as u32 * power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = *a + load(i, k);
        }
        i += 1;
    }
    for j in 1..LEVELS as usize {
        for k in 0..R {
            acc[0][k] = acc[0][k] + acc[j][k];
        }
    }
    acc[0]
}

/// `row_sum`: four interleaved cascades, the leftover steps added to the first, then the four.
#[inline(always)]
fn row_sum<T: Zero>(size: usize, load: impl Fn(usize) -> T) -> T {
    let ilp = size / 4;
    let mut p = multi_row_sum::<T, 4>(ilp, |i, k| load(i * 4 + k));
    for i in ilp * 4..size {
        p[0] = p[0] + load(i);
    }
    p[0] + p[1] + p[2] + p[3]
}

fn vector_sum<const L: usize>(x: &[f32]) -> f32 {
    let n = x.len() / L;
    let acc = row_sum::<V<L>>(n, |v| {
        V(x[v * L..v * L + L].try_into().expect("L elements"))
    });
    let mut total = 0f32;
    for &t in &x[n * L..] {
        total += t;
    }
    for a in acc.0 {
        total += a;
    }
    total
}

/// The reduction loop of `cascade_sum` over one contiguous run.
fn run_sum(x: &[f32], lanes: usize) -> f32 {
    if x.len() < lanes {
        return row_sum::<f32>(x.len(), |i| x[i]);
    }
    match lanes {
        16 => vector_sum::<16>(x),
        _ => vector_sum::<8>(x),
    }
}

/// `x.sum()` of a contiguous float32 tensor as torch computes it with `order`.
pub fn sum(x: &[f32], order: SumOrder) -> f32 {
    let n = x.len();
    let threads = order.threads.max(1);
    if n < GRAIN || threads == 1 {
        return 0.0 + run_sum(x, order.lanes);
    }
    // two_pass_reduction: OpenMP chunks of ceil(n / used) into per-thread partials, unused
    // partials left at 0, then one more reduction over all `threads` partials.
    let used = threads.min(n.div_ceil(GRAIN));
    let chunk = n.div_ceil(used);
    let mut partials = vec![0f32; threads];
    for (t, p) in partials.iter_mut().enumerate() {
        let begin = t * chunk;
        if begin < n {
            *p = 0.0 + run_sum(&x[begin..n.min(begin + chunk)], order.lanes);
        }
    }
    0.0 + run_sum(&partials, order.lanes)
}

/// `x.mean()` as torch computes it: the sum above divided by `n` as float32.
pub fn mean(x: &[f32], order: SumOrder) -> f32 {
    sum(x, order) / x.len() as f32
}

/// `x.mean(dim=-1)` of one row: rows reduce independently, never split over threads.
pub fn row_mean(x: &[f32], lanes: usize) -> f32 {
    (0.0 + run_sum(x, lanes)) / x.len() as f32
}
