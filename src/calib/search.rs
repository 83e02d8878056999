//! Choosing (scale, zero point) from a histogram: the clip range that minimises the expected
//! quantization MSE over integer affine grids, a percentile of |x|, or TensorRT's KL divergence.
use super::Histogram;
use crate::names::string_enum;
use crate::quant::spec::qparams_from_minmax;
use crate::quant::QRange;
use crate::{ensure, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Minimise the expected squared error (the same optimum as `Sqnr`).
    Mse,
    /// Maximise the signal-to-quantization-noise ratio: for a fixed signal, minimum MSE.
    Sqnr,
    /// Clip at this percentile (0..100] of |x|.
    Percentile(f64),
    /// TensorRT's entropy calibration: the |x| threshold minimising KL(P || Q) with
    /// `2^(bits-1)` quantized bins.
    Entropy,
}

string_enum!(Method, "method", {
    "mse" => Mse,
    "sqnr" => Sqnr,
    "percentile" => Percentile(99.99),
    "entropy" => Entropy,
});

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchResult {
    pub scale: f32,
    pub zero_point: i32,
    /// The range the qparams represent, `[(qmin - zp) s, (qmax - zp) s]`, for every method.
    pub clip: (f64, f64),
    /// Expected squared error per value under the histogram model.
    pub expected_mse: f64,
}

/// The data as a piecewise-uniform density: bin `k` spreads its count evenly over the part of
/// the bin inside `[min, max]`. `F(t)` = (count, Σx, Σx²) of the data below `t`.
struct Density<'a> {
    h: &'a Histogram,
    left: f64,
    w: f64,
    /// Prefix sums over bins of (count, Σx, Σx²).
    pre: Vec<[f64; 3]>,
}

impl<'a> Density<'a> {
    fn new(h: &'a Histogram) -> Self {
        let (left, w) = h.grid();
        let mut pre = Vec::with_capacity(h.bins + 1);
        let mut acc = [0f64; 3];
        pre.push(acc);
        for (k, &c) in h.counts.iter().enumerate() {
            let (u, v) = Self::support(h, left, w, k);
            let n = c as f64;
            acc[0] += n;
            acc[1] += n * (u + v) / 2.0;
            acc[2] += n * (u * u + u * v + v * v) / 3.0;
            pre.push(acc);
        }
        Density { h, left, w, pre }
    }

    fn support(h: &Histogram, left: f64, w: f64, k: usize) -> (f64, f64) {
        let a = left + k as f64 * w;
        ((a).max(h.min as f64), (a + w).min(h.max as f64))
    }

    fn total(&self) -> [f64; 3] {
        self.pre[self.h.bins]
    }

    fn cum(&self, t: f64) -> [f64; 3] {
        if t <= self.h.min as f64 {
            return [0.0; 3];
        }
        if t > self.h.max as f64 {
            return self.total();
        }
        let k = (((t - self.left) / self.w).floor().max(0.0) as usize).min(self.h.bins - 1);
        let (u, v) = Self::support(self.h, self.left, self.w, k);
        let base = self.pre[k];
        if t <= u {
            return base;
        }
        if t >= v {
            return self.pre[k + 1];
        }
        let n = self.h.counts[k] as f64 * (t - u) / (v - u);
        [
            base[0] + n,
            base[1] + n * (u + t) / 2.0,
            base[2] + n * (u * u + u * t + t * t) / 3.0,
        ]
    }
}

/// Σ (x - c)² over the data in a cell, from the cumulative sums at its ends.
fn cell_error(lo: [f64; 3], hi: [f64; 3], c: f64) -> f64 {
    let (n, s1, s2) = (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]);
    (s2 - 2.0 * c * s1 + c * c * n).max(0.0)
}

/// The best window of `levels` consecutive multiples of `s` containing 0 (asymmetric), or the
/// window starting at level `fixed` (symmetric): returns (total squared error, lowest level index).
fn best_window(d: &Density<'_>, s: f64, levels: i64, fixed: Option<i64>) -> (f64, i64) {
    let (min, max) = (d.h.min as f64, d.h.max as f64);
    let tot = d.total();
    // Cell boundaries b_j = (j + 1/2) s for the lattice indices the data touches; windows only
    // ever look at boundaries in [-levels, levels], so none further out is evaluated.
    // Both ends are clamped into that range: data wholly on one side of 0 and far from it (a
    // range excluding 0, or a fine step) would otherwise put j0 above j1.
    let j0 = ((min / s - 0.5).floor() as i64 - 1).clamp(-levels - 1, levels + 1);
    let j1 = ((max / s + 0.5).ceil() as i64 + 1).clamp(-levels - 1, levels + 1);
    let f: Vec<[f64; 3]> = (j0..=j1).map(|j| d.cum((j as f64 + 0.5) * s)).collect();
    // Only called for j in [-levels, levels - 1]: outside [j0, j1] that means past the data.
    let at = |j: i64| -> [f64; 3] {
        if j < j0 {
            [0.0; 3]
        } else if j > j1 {
            tot
        } else {
            f[(j - j0) as usize]
        }
    };
    // inner[k]: error of lattice cell k (between b_{k-1} and b_k), prefix-summed.
    let mut inner = vec![0f64; (j1 - j0 + 2) as usize];
    for k in (j0 + 1)..=j1 {
        let e = cell_error(at(k - 1), at(k), k as f64 * s);
        inner[(k - j0) as usize] = inner[(k - j0 - 1) as usize] + e;
    }
    let inner_sum = |a: i64, b: i64| -> f64 {
        // Σ cells a..=b, clamped to where there is data
        let (a, b) = (a.max(j0 + 1), b.min(j1));
        if a > b {
            0.0
        } else {
            inner[(b - j0) as usize] - inner[(a - j0 - 1) as usize]
        }
    };
    let window = |kl: i64| -> f64 {
        let kh = kl + levels - 1;
        let low = cell_error([0.0; 3], at(kl), kl as f64 * s);
        let high = cell_error(at(kh - 1), tot, kh as f64 * s);
        low + inner_sum(kl + 1, kh - 1) + high
    };
    if let Some(kl) = fixed {
        (window(kl), kl)
    } else {
        (-(levels - 1)..=0)
            .map(|kl| (window(kl), kl))
            .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a })
    }
}

fn mse_search(h: &Histogram, r: QRange, symmetric: bool) -> SearchResult {
    let d = Density::new(h);
    let levels = (r.max - r.min) as i64 + 1;
    let (lo, hi) = ((h.min as f64).min(0.0), (h.max as f64).max(0.0));
    // The symmetric grid keeps torch.ao's zero point (0, or the middle of an unsigned range), so
    // its window is fixed: levels kl..kl + levels - 1 around it.
    let zp_sym = if r.is_signed() {
        0
    } else {
        (r.min + r.max) / 2
    };
    let fixed = symmetric.then_some((r.min - zp_sym) as i64);
    let s_hi = if symmetric {
        (-lo / (zp_sym - r.min).max(1) as f64).max(hi / (r.max - zp_sym).max(1) as f64)
    } else {
        (hi - lo) / (levels - 1) as f64
    };
    // torch.ao never picks a scale below float32's epsilon (its observers clamp to it): neither
    // does the search, so tiny and denormal ranges get the same grid as from min-max.
    let s_min = f32::EPSILON as f64;
    if s_hi <= s_min || !s_hi.is_finite() {
        let (scale, zero_point) = qparams_from_minmax(h.min, h.max, r, symmetric);
        return SearchResult {
            scale,
            zero_point,
            clip: (0.0, 0.0),
            expected_mse: 0.0,
        };
    }
    let eval = |s: f64| best_window(&d, s, levels, fixed);
    // Coarse: log-spaced steps from no clipping down to a 64x narrower range; then golden section.
    const COARSE: usize = 96;
    let ratio = 64f64.powf(1.0 / (COARSE - 1) as f64);
    let mut best = (f64::INFINITY, 0i64, s_hi);
    for i in 0..COARSE {
        let s = (s_hi / ratio.powi(i as i32)).max(s_min);
        let (e, kl) = eval(s);
        if e < best.0 {
            best = (e, kl, s);
        }
    }
    let (mut a, mut b) = (
        (best.2 / ratio).max(s_min).ln(),
        (best.2 * ratio).min(s_hi * 1.0001).ln(),
    );
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut dd) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (eval(c.exp()), eval(dd.exp()));
    for _ in 0..40 {
        if fc.0 < fd.0 {
            (b, dd, fd) = (dd, c, fc);
            c = b - g * (b - a);
            fc = eval(c.exp());
        } else {
            (a, c, fc) = (c, dd, fd);
            dd = a + g * (b - a);
            fd = eval(dd.exp());
        }
    }
    for (e, kl, s) in [(fc.0, fc.1, c.exp()), (fd.0, fd.1, dd.exp())] {
        if e < best.0 {
            best = (e, kl, s);
        }
    }
    let (e, kl, s) = best;
    let scale = s as f32;
    let zero_point = (r.min as i64 - kl) as i32; // zp_sym when symmetric
    let sf = scale as f64;
    SearchResult {
        scale,
        zero_point,
        clip: (
            (r.min - zero_point) as f64 * sf,
            (r.max - zero_point) as f64 * sf,
        ),
        expected_mse: e / h.total as f64,
    }
}

/// The |x| histogram: bin j covers |x| in [j w, (j + 1) w), with `w` the histogram's bin width
/// doubled as often as needed for at most `bins` bins (pairs of bins merge exactly). Data far
/// from 0 on a fine grid (a constant channel: one bin at index ~2^60) would otherwise need an
/// |x| histogram of 2^60 mostly empty bins. Returns the counts and their width.
fn abs_counts(h: &Histogram) -> (Vec<f64>, f64) {
    let (_, w) = h.grid();
    let reach = (h.start + h.bins as i64).abs().max(h.start.abs()) as u64;
    let mut d = 0u32;
    while (reach >> d) >= h.bins as u64 {
        d += 1;
    }
    let n = (reach >> d) as usize + 1;
    let mut out = vec![0f64; n];
    for (k, &c) in h.counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let g = (h.start + k as i64) >> d; // coarse bin [g w', (g+1) w'), floor division
        let j = if g >= 0 { g } else { -g - 1 };
        out[j as usize] += c as f64;
    }
    while out.len() > 1 && out[out.len() - 1] == 0.0 {
        out.pop();
    }
    (out, w * 2f64.powi(d as i32))
}

fn percentile_threshold(h: &Histogram, p: f64) -> f64 {
    let (a, w) = abs_counts(h);
    let target = p / 100.0 * h.total as f64;
    let mut cum = 0.0;
    for (j, &c) in a.iter().enumerate() {
        if cum + c >= target && c > 0.0 {
            return (j as f64 + (target - cum) / c) * w;
        }
        cum += c;
    }
    a.len() as f64 * w
}

/// MXNet's `_smooth_distribution`: move `eps` of mass onto the zero bins.
fn smooth(p: &mut [f64]) -> bool {
    const EPS: f64 = 1e-4;
    let zeros = p.iter().filter(|v| **v == 0.0).count();
    let nonzeros = p.len() - zeros;
    if nonzeros == 0 {
        return false;
    }
    let eps1 = EPS * zeros as f64 / nonzeros as f64;
    for v in p.iter_mut() {
        *v += if *v == 0.0 { EPS } else { -eps1 };
    }
    true
}

fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    p.iter()
        .zip(q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| (a / sp) * ((a / sp) / (b / sq)).ln())
        .sum()
}

/// TensorRT's entropy calibration on the |x| histogram: for every threshold of `i >= target`
/// bins, P is the clipped histogram (outliers added to its last bin), Q its quantization to
/// `target` bins spread back over P's non-empty bins; pick the threshold with the least KL.
fn entropy_threshold(h: &Histogram, target: usize) -> f64 {
    let (hist, w) = abs_counts(h);
    let nb = hist.len();
    if nb <= target {
        return nb as f64 * w;
    }
    let mut best = (f64::INFINITY, nb);
    let mut outliers: f64 = hist[target..].iter().sum();
    for i in target..=nb {
        let sliced = &hist[..i];
        let mut p = sliced.to_vec();
        p[i - 1] += outliers;
        if i < nb {
            outliers -= hist[i];
        }
        let merged = i / target;
        let mut q = vec![0f64; i];
        for j in 0..target {
            let a = j * merged;
            let b = if j == target - 1 { i } else { a + merged };
            let total: f64 = sliced[a..b].iter().sum();
            let nonzero = sliced[a..b].iter().filter(|v| **v != 0.0).count();
            if nonzero > 0 {
                for k in a..b {
                    if sliced[k] != 0.0 {
                        q[k] = total / nonzero as f64;
                    }
                }
            }
        }
        if !smooth(&mut p) || !smooth(&mut q) {
            continue;
        }
        let kl = kl_divergence(&p, &q);
        if kl < best.0 {
            best = (kl, i);
        }
    }
    best.1 as f64 * w
}

/// Scale and zero point for the histogram's data with `method`.
pub fn search(h: &Histogram, r: QRange, symmetric: bool, method: Method) -> Result<SearchResult> {
    ensure!(!h.is_empty(), "the observer has seen no data yet");
    let amax = (h.min as f64).abs().max((h.max as f64).abs());
    let from_threshold = |t: f64| {
        let t = t.min(amax); // a bin edge may lie past the largest value
        let (lo, hi) = if symmetric {
            (-t, t)
        } else {
            ((h.min as f64).max(-t), (h.max as f64).min(t))
        };
        let (scale, zero_point) = qparams_from_minmax(lo as f32, hi as f32, r, symmetric);
        let sf = scale as f64;
        let clip = (
            (r.min - zero_point) as f64 * sf,
            (r.max - zero_point) as f64 * sf,
        );
        SearchResult {
            scale,
            zero_point,
            clip,
            expected_mse: f64::NAN,
        }
    };
    Ok(match method {
        Method::Mse | Method::Sqnr => mse_search(h, r, symmetric),
        Method::Percentile(p) => {
            ensure!(
                p > 0.0 && p <= 100.0,
                "percentile must be in (0, 100], got {p}"
            );
            from_threshold(percentile_threshold(h, p))
        }
        Method::Entropy => from_threshold(entropy_threshold(h, 1usize << (r.bits() - 1))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian samples by Box-Muller from a fixed LCG.
    fn gaussian(n: usize) -> Vec<f32> {
        let mut s = 12345u64;
        let mut u = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| ((-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos()) as f32)
            .collect()
    }

    fn histogram_of(x: &[f32]) -> Histogram {
        let mut h = Histogram::new(2048).unwrap();
        h.update(&ndarray::aview1(x).into_dyn()).unwrap();
        h
    }

    fn sqnr(x: &[f32], s: f32, zp: i32, r: QRange) -> f64 {
        let (mut sig, mut err) = (0f64, 0f64);
        for &v in x {
            let q =
                (zp as f32 + (v * (1.0 / s)).round_ties_even()).clamp(r.min as f32, r.max as f32);
            let xh = (q - zp as f32) * s;
            sig += (v as f64).powi(2);
            err += (v as f64 - xh as f64).powi(2);
        }
        10.0 * (sig / err).log10()
    }

    #[test]
    fn mse_search_reaches_the_best_grid_on_a_gaussian() {
        let x = gaussian(1 << 20);
        let h = histogram_of(&x);
        for (bits, want) in [(2u32, 8.26), (3, 13.91), (4, 19.26), (8, 40.57)] {
            let r = QRange::for_bits(bits, false).unwrap();
            let res = search(&h, r, false, Method::Mse).unwrap();
            let got = sqnr(&x, res.scale, res.zero_point, r);
            assert!(got > want - 0.1, "{bits} bits: {got:.3} dB < {want}");
            let predicted = 10.0 * (1.0f64 / res.expected_mse).log10();
            assert!(
                (predicted - got).abs() < 0.1,
                "model {predicted:.3} vs data {got:.3}"
            );
        }
    }

    #[test]
    fn percentile_and_entropy_thresholds_are_sane() {
        let x = gaussian(1 << 18);
        let h = histogram_of(&x);
        let t = percentile_threshold(&h, 99.0);
        assert!((t - 2.5758).abs() < 0.03, "{t}"); // two-sided 99% of |N(0,1)|
        let te = entropy_threshold(&h, 128);
        assert!(
            te > 2.0 && te <= h.max.abs().max(h.min.abs()) as f64 + 0.01,
            "{te}"
        );
    }

    /// The realised squared error of (scale, zp) on `x`, in f64.
    fn mse_of(x: &[f32], s: f32, zp: i32, r: QRange) -> f64 {
        x.iter()
            .map(|&v| {
                let q = (zp as f32 + (v * (1.0 / s)).round_ties_even())
                    .clamp(r.min as f32, r.max as f32);
                (v as f64 - ((q - zp as f32) * s) as f64).powi(2)
            })
            .sum::<f64>()
            / x.len() as f64
    }

    #[test]
    fn degenerate_data_gets_valid_qparams_from_every_method() {
        let ramp = |lo: f32, hi: f32, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (lo as f64 + (hi as f64 - lo as f64) * i as f64 / (n - 1).max(1) as f64) as f32
                })
                .collect()
        };
        let cases: Vec<(&str, Vec<f32>)> = vec![
            ("all positive", vec![1.0, 1.5, 2.0]),
            ("after avgpool", ramp(0.05, 0.84, 1000)),
            ("all negative", ramp(-3.0, -0.5, 777)),
            ("constant", vec![7.0; 200]),
            ("constant negative", vec![-7.0; 200]),
            ("nearly dead", vec![1e-30; 200]),
            ("single value", vec![0.25]),
            ("zero", vec![0.0; 10]),
            ("tiny range", ramp(1.0, 1.0 + 1e-6, 100)),
            ("denormal range", ramp(1e-40, 3e-40, 100)),
            ("one-sided huge", ramp(1e30, 3e38, 100)),
            ("both sides huge", ramp(-3e38, 3e38, 100)),
        ];
        let methods = [
            Method::Mse,
            Method::Sqnr,
            Method::Percentile(99.99),
            Method::Percentile(50.0),
            Method::Entropy,
        ];
        for (name, x) in &cases {
            let h = histogram_of(x);
            for bits in [2u32, 3, 4, 8] {
                for symmetric in [false, true] {
                    let r = QRange::for_bits(bits, false).unwrap();
                    let (s0, z0) = qparams_from_minmax(h.min, h.max, r, symmetric);
                    for m in methods {
                        let what = format!("{name}, {bits} bits, symmetric {symmetric}, {m:?}");
                        let res =
                            search(&h, r, symmetric, m).unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert!(
                            // ±3e38 overflows float32's (max - min) / levels, in torch.ao too
                            (res.scale.is_finite() || !s0.is_finite()) && res.scale >= f32::EPSILON,
                            "{what}: scale {}",
                            res.scale
                        );
                        assert!(
                            (r.min..=r.max).contains(&res.zero_point),
                            "{what}: zero point {}",
                            res.zero_point
                        );
                        if matches!(m, Method::Mse | Method::Sqnr) {
                            // Never worse than the min-max grid it searches beyond.
                            let (got, base) = (
                                mse_of(x, res.scale, res.zero_point, r),
                                mse_of(x, s0, z0, r),
                            );
                            assert!(
                                got <= base * (1.0 + 1e-3) + 1e-30 || !base.is_finite(),
                                "{what}: mse {got} > min-max {base}"
                            );
                        }
                    }
                }
            }
        }
    }
}
