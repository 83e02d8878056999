//! Randomized Hadamard rotations (incoherence processing: QuIP#, QuaRot): an orthogonal `R`
//! with `x R` (inputs) and `W R` (weights) such that `(W R)(x R)ᵀ = W xᵀ`, which spreads a
//! weight row's outliers over its whole block, so a grid fits every group better.
//!
//! `R = D H`: `D` a diagonal of random signs, `H` block diagonal with Sylvester-Hadamard
//! blocks scaled by `1/√b`, `b` the largest power of two dividing the feature count (384 →
//! 128, 1536 → 512), applied by the fast Walsh–Hadamard transform: `b log₂ b` additions per
//! block instead of `b²` multiply-adds.
use crate::ensure;
use crate::Result;
use ndarray::{Array2, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// A randomized block-Hadamard rotation of `features` inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotation {
    pub features: usize,
    /// Size of each Hadamard block: the largest power of two dividing `features`.
    pub block: usize,
    /// `D`'s diagonal: ±1 per feature.
    pub signs: Vec<f64>,
}

/// The normalized Walsh–Hadamard transform of `v` (length a power of two) in place:
/// `v ← v H / √len`; its own inverse. `scale` is `1/√len` in `v`'s type.
fn fwht<T>(v: &mut [T], scale: T)
where
    T: Copy + std::ops::Add<Output = T> + std::ops::Sub<Output = T> + std::ops::MulAssign,
{
    let n = v.len();
    let mut h = 1;
    while h < n {
        for pair in v.chunks_exact_mut(2 * h) {
            let (a, b) = pair.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                (*x, *y) = (*x + *y, *x - *y);
            }
        }
        h *= 2;
    }
    v.iter_mut().for_each(|x| *x *= scale);
}

impl Rotation {
    /// The rotation of `features` inputs whose signs `seed` draws (splitmix64: the same signs
    /// on every machine).
    pub fn new(features: usize, seed: u64) -> Result<Rotation> {
        ensure!(features > 0, "a rotation needs at least one feature");
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(features as u64);
        let signs = (0..features)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                if (z ^ (z >> 31)) & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        Ok(Rotation {
            features,
            block: 1 << features.trailing_zeros(),
            signs,
        })
    }

    fn check(&self, x: &ArrayViewMut2<'_, f64>) -> Result<()> {
        ensure!(
            x.ncols() == self.features && x.is_standard_layout(),
            "the rotation is of {} features, got a ({}, {}) matrix",
            self.features,
            x.nrows(),
            x.ncols()
        );
        Ok(())
    }

    /// `x ← x R` for each row of `x` (rows × features), or `x ← x Rᵀ` with `inverse`.
    pub fn apply(&self, mut x: ArrayViewMut2<'_, f64>, inverse: bool) -> Result<()> {
        self.check(&x)?;
        x.axis_iter_mut(Axis(0))
            .into_par_iter()
            .for_each(|mut row| {
                let row = row.as_slice_mut().expect("standard layout");
                if !inverse {
                    row.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
                }
                let scale = 1.0 / (self.block as f64).sqrt();
                row.chunks_exact_mut(self.block)
                    .for_each(|b| fwht(b, scale));
                if inverse {
                    row.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
                }
            });
        Ok(())
    }

    /// `x ← x R` for each row of `x`, float32 rows of `features` values back to back (a
    /// runtime layer rotating its input online).
    pub fn apply_f32(&self, x: &mut [f32]) -> Result<()> {
        ensure!(
            x.len().is_multiple_of(self.features),
            "the rotation is of {} features, got {} values",
            self.features,
            x.len()
        );
        let scale = 1.0 / (self.block as f32).sqrt();
        x.par_chunks_mut(self.features).for_each(|row| {
            row.iter_mut()
                .zip(&self.signs)
                .for_each(|(v, s)| *v *= *s as f32);
            row.chunks_exact_mut(self.block)
                .for_each(|b| fwht(b, scale));
        });
        Ok(())
    }

    /// `Rᵀ h R`: the Hessian `Σ x xᵀ` of the rotated inputs `x R`, for a symmetric `h`.
    pub fn conjugate(&self, h: &Array2<f64>) -> Result<Array2<f64>> {
        let mut hr = h.to_owned();
        self.apply(hr.view_mut(), false)?; // h R
        let mut t = hr.t().as_standard_layout().into_owned(); // Rᵀ hᵀ = Rᵀ h
        self.apply(t.view_mut(), false)?; // (Rᵀ h) R
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float32_rows_rotate_as_float64_ones() {
        let r = Rotation::new(24, 7).unwrap();
        let x: Vec<f32> = (0..72)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let mut x64 = Array2::from_shape_fn((3, 24), |(i, j)| x[i * 24 + j] as f64);
        r.apply(x64.view_mut(), false).unwrap();
        let mut x32 = x.clone();
        r.apply_f32(&mut x32).unwrap();
        for (a, b) in x32.iter().zip(x64.iter()) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} {b}");
        }
        assert!(r.apply_f32(&mut x32[..23]).is_err());
    }

    fn dense(r: &Rotation) -> Array2<f64> {
        let mut m = Array2::<f64>::eye(r.features);
        r.apply(m.view_mut(), false).unwrap();
        m
    }

    #[test]
    fn rotations_are_orthogonal_block_hadamard_and_invert_exactly() {
        for (n, block) in [(1, 1), (6, 2), (12, 4), (384, 128), (64, 64)] {
            let r = Rotation::new(n, 7).unwrap();
            assert_eq!(r.block, block);
            let m = dense(&r);
            let eye = m.t().dot(&m);
            for ((i, j), v) in eye.indexed_iter() {
                assert!(
                    (v - f64::from(u8::from(i == j))).abs() < 1e-12,
                    "{n}: ({i},{j}) {v}"
                );
            }
            // Block diagonal, every entry of a block ±1/√b.
            for ((i, j), v) in m.indexed_iter() {
                if i / block == j / block {
                    assert!((v.abs() - 1.0 / (block as f64).sqrt()).abs() < 1e-12);
                } else {
                    assert_eq!(*v, 0.0);
                }
            }
            let x = Array2::from_shape_fn((3, n), |(i, j)| ((i * 31 + j * 7) % 11) as f64 - 5.0);
            let mut y = x.clone();
            r.apply(y.view_mut(), false).unwrap();
            assert!((&y - &x.dot(&m)).iter().all(|v| v.abs() < 1e-9));
            r.apply(y.view_mut(), true).unwrap();
            assert!((&y - &x).iter().all(|v| v.abs() < 1e-9));
            // The rotated inputs' Hessian.
            let h = x.t().dot(&x);
            let want = m.t().dot(&h).dot(&m);
            assert!((&r.conjugate(&h).unwrap() - &want)
                .iter()
                .all(|v| v.abs() < 1e-9));
        }
    }

    #[test]
    fn signs_depend_on_the_seed_only_and_bad_shapes_are_refused() {
        let (a, b) = (
            Rotation::new(256, 1).unwrap(),
            Rotation::new(256, 2).unwrap(),
        );
        assert_eq!(a, Rotation::new(256, 1).unwrap());
        assert_ne!(a.signs, b.signs);
        let pos = a.signs.iter().filter(|&&s| s > 0.0).count();
        assert!((96..160).contains(&pos), "{pos} of 256 positive");
        assert!(Rotation::new(0, 0).is_err());
        let mut x = Array2::<f64>::zeros((2, 255));
        assert!(a.apply(x.view_mut(), false).is_err());
    }
}
