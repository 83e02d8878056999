//! The dense linear algebra GPTQ needs, in float64 on row-major `n x n` matrices: the upper
//! Cholesky factor of a symmetric positive definite matrix's inverse, by one Cholesky
//! factorisation (which reports where positive definiteness fails) and one triangular inverse.
use crate::quant::simd::{dispatch, Isa, Kernel};
use crate::{Error, Result};
use ndarray::{Array2, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Lanes of [`dot`]'s independent partial sums: four 512-bit registers, enough to hide the
/// add latency.
const LANES: usize = 32;

/// Rows (or columns) below which a step runs on the calling thread alone.
const SERIAL: usize = 64;

/// Rows of the factor per parallel piece of a column.
const ROWS: usize = 32;

/// `Σ a[k] b[k]` in [`LANES`] independent lanes (vectorizes; the order differs from a plain
/// loop's in the last bits only, and is the same on every instruction set).
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

fn not_definite(j: usize, d: f64) -> Error {
    Error::value(format!(
        "the Hessian is not positive definite (pivot {j} is {d:e})"
    ))
}

/// Rows `first..` of column `j` of the Cholesky factor (`rows` are those rows of it, filled up
/// to column `j`): `l[i,j] = (a[i,j] - l[i,..j] · l[j,..j]) / l[j,j]`.
struct BelowPivot<'a> {
    a: &'a Array2<f64>,
    rows: ArrayViewMut2<'a, f64>,
    first: usize,
    lj: &'a [f64],
    d: f64,
}

impl Kernel for BelowPivot<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Isa>(mut self) {
        let j = self.lj.len();
        for (k, mut li) in self.rows.outer_iter_mut().enumerate() {
            let row = li.as_slice_mut().expect("row-major");
            row[j] = (self.a[[self.first + k, j]] - dot(&row[..j], self.lj)) / self.d;
        }
    }
}

/// Column `j` of `l⁻¹` for a lower-triangular `l` with a positive diagonal, into `x` (zero on
/// entry), by forward substitution of `l x = e_j`: `x_i = -l[i,j..i] · x[j..i] / l[i,i]`.
struct InverseColumn<'a> {
    l: &'a Array2<f64>,
    j: usize,
    x: &'a mut [f64],
}

impl Kernel for InverseColumn<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Isa>(self) {
        let (l, j, x) = (self.l, self.j, self.x);
        x[j] = 1.0 / l[[j, j]];
        for i in j + 1..l.nrows() {
            let li = &l.row(i).to_slice().expect("row-major")[j..i];
            x[i] = -dot(li, &x[j..i]) / l[[i, i]];
        }
    }
}

/// Lower-triangular `L` with `L Lᵀ = a` (the upper triangle is zero), or the index and value
/// of the first pivot that is not positive and finite. Column by column; a column's entries
/// below the pivot are independent, computed in parallel pieces.
fn factor(a: &Array2<f64>) -> std::result::Result<Array2<f64>, (usize, f64)> {
    let n = a.nrows();
    debug_assert_eq!(n, a.ncols());
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let (done, mut rest) = l.view_mut().split_at(Axis(0), j + 1);
        let lj = done.row(j);
        let lj = &lj.as_slice().expect("row-major")[..j];
        let d = a[[j, j]] - dot(lj, lj);
        if !(d > 0.0 && d.is_finite()) {
            return Err((j, d));
        }
        let d = d.sqrt();
        let piece = |(p, rows): (usize, ArrayViewMut2<'_, f64>)| {
            let first = j + 1 + p * ROWS;
            dispatch(BelowPivot {
                a,
                rows,
                first,
                lj,
                d,
            })
        };
        if (n - j) * j < SERIAL * SERIAL {
            piece((0, rest.view_mut()));
        } else {
            rest.axis_chunks_iter_mut(Axis(0), ROWS)
                .into_par_iter()
                .enumerate()
                .for_each(piece);
        }
        l[[j, j]] = d;
    }
    Ok(l)
}

/// The transpose of `l⁻¹` (row `j` is column `j` of the inverse), the columns in parallel.
fn invert_lower_t(l: &Array2<f64>) -> Array2<f64> {
    let n = l.nrows();
    let mut inv_t = Array2::<f64>::zeros((n, n));
    let column = |(j, mut x): (usize, ndarray::ArrayViewMut1<'_, f64>)| {
        let x = x.as_slice_mut().expect("row-major");
        dispatch(InverseColumn { l, j, x })
    };
    if n < SERIAL {
        inv_t.outer_iter_mut().enumerate().for_each(column);
    } else {
        // Column j costs (n - j)²: pieces of a few columns keep both threads busy to the end.
        inv_t
            .outer_iter_mut()
            .into_par_iter()
            .with_max_len(8)
            .enumerate()
            .for_each(column);
    }
    inv_t
}

/// Upper-triangular `U` with `Uᵀ U = a⁻¹`, for a symmetric positive definite `a`: what GPTQ
/// reads its error-feedback rows from (`torch.linalg.cholesky(torch.cholesky_inverse(L),
/// upper=True)` in the reference).
///
/// Without forming `a⁻¹`: with `J` the reversal, `J a J = L Lᵀ` gives `a = R Rᵀ` for the upper
/// `R = J L J`, so `a⁻¹ = R⁻ᵀ R⁻¹` and `U = R⁻¹ = J L⁻¹ J` (the Cholesky factor is unique).
pub fn inverse_cholesky_upper(a: &Array2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let rev = Array2::from_shape_fn((n, n), |(i, j)| a[[n - 1 - i, n - 1 - j]]);
    // A failed pivot is reported in the caller's order.
    let l = factor(&rev).map_err(|(j, d)| not_definite(n - 1 - j, d))?;
    let linv_t = invert_lower_t(&l);
    Ok(Array2::from_shape_fn((n, n), |(i, j)| {
        linv_t[[n - 1 - j, n - 1 - i]]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize, seed: u64) -> Array2<f64> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let x = Array2::from_shape_fn((n, 2 * n), |_| next());
        x.dot(&x.t()) + Array2::<f64>::eye(n) * 0.1
    }

    #[test]
    fn factors_reproduce_the_matrix_and_its_inverse() {
        let a = spd(17, 3);
        let l = factor(&a).unwrap();
        assert!((l.dot(&l.t()) - &a).iter().all(|v| v.abs() < 1e-10));
        let u = inverse_cholesky_upper(&a).unwrap();
        for i in 0..17 {
            for j in 0..i {
                assert_eq!(u[[i, j]], 0.0, "upper triangular");
            }
        }
        let eye = u.t().dot(&u).dot(&a);
        for ((i, j), v) in eye.indexed_iter() {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((v - want).abs() < 1e-9, "({i},{j}) = {v}");
        }
    }

    #[test]
    fn an_indefinite_matrix_is_refused_not_nan() {
        let mut a = spd(5, 1);
        a[[3, 3]] = -1.0;
        assert_eq!(factor(&a).unwrap_err().0, 3);
        let e = inverse_cholesky_upper(&a).unwrap_err().to_string();
        assert!(e.contains("not positive definite (pivot 3 is"), "{e}");
        let z = Array2::<f64>::zeros((3, 3));
        assert!(inverse_cholesky_upper(&z).is_err());
        let mut n = spd(4, 2);
        n[[1, 1]] = f64::NAN;
        assert!(inverse_cholesky_upper(&n).is_err());
    }
}
