//! The dense linear algebra GPTQ needs, in float64 on row-major `n x n` matrices: the upper
//! Cholesky factor of a symmetric positive definite matrix's inverse, by one Cholesky
//! factorisation (which reports where positive definiteness fails) and one triangular inverse.
use crate::{Error, Result};
use ndarray::{Array2, Axis};

/// `Σ a[k] b[k]` in eight independent lanes (vectorizes; the order differs from a plain loop's
/// in the last bits only).
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
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

/// Lower-triangular `L` with `L Lᵀ = a` (the upper triangle is zero), or the index and value
/// of the first pivot that is not positive and finite.
fn factor(a: &Array2<f64>) -> std::result::Result<Array2<f64>, (usize, f64)> {
    let n = a.nrows();
    debug_assert_eq!(n, a.ncols());
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let (done, rest) = l.view_mut().split_at(Axis(0), j + 1);
        let lj = done.row(j);
        let lj = &lj.as_slice().expect("row-major")[..j];
        let d = a[[j, j]] - dot(lj, lj);
        if !(d > 0.0 && d.is_finite()) {
            return Err((j, d));
        }
        let d = d.sqrt();
        let mut rest = rest;
        for (k, mut li) in rest.outer_iter_mut().enumerate() {
            let i = j + 1 + k;
            let row = li.as_slice_mut().expect("row-major");
            row[j] = (a[[i, j]] - dot(&row[..j], lj)) / d;
        }
        l[[j, j]] = d;
    }
    Ok(l)
}

/// The inverse of a lower-triangular matrix with a positive diagonal, row by row
/// (`inv[i] = (e_i - Σ_{k<i} l[i,k] inv[k]) / l[i,i]`: contiguous row updates).
fn invert_lower(l: &Array2<f64>) -> Array2<f64> {
    let n = l.nrows();
    let mut inv = Array2::<f64>::zeros((n, n));
    for i in 0..n {
        let (done, mut rest) = inv.view_mut().split_at(Axis(0), i);
        let mut row = rest.row_mut(0);
        let row = row.as_slice_mut().expect("row-major");
        row[i] = 1.0;
        for k in 0..i {
            let c = l[[i, k]];
            if c != 0.0 {
                let rk = done.row(k);
                for (r, v) in row[..=k].iter_mut().zip(rk.as_slice().expect("row-major")) {
                    *r -= c * v;
                }
            }
        }
        let d = l[[i, i]];
        row[..=i].iter_mut().for_each(|v| *v /= d);
    }
    inv
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
    let linv = invert_lower(&l);
    Ok(Array2::from_shape_fn((n, n), |(i, j)| {
        linv[[n - 1 - i, n - 1 - j]]
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
