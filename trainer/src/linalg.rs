//! The little linear algebra the trainer needs, in plain ndarray (no BLAS/LAPACK to
//! install): a sparse symmetric matrix, orthonormalisation, the Jacobi eigen-solver for
//! small symmetric matrices, and a randomised eigen-decomposition built from them.

use ndarray::{s, Array1, Array2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A square sparse matrix in compressed-row form.
#[derive(Debug, Clone)]
pub struct Csr {
    pub n: usize,
    pub row_start: Vec<usize>,
    pub cols: Vec<u32>,
    pub values: Vec<f32>,
}

impl Csr {
    /// Builds from (row, col, value) triples; duplicates are summed.
    pub fn from_triples(n: usize, mut triples: Vec<(u32, u32, f32)>) -> Csr {
        triples.sort_unstable_by_key(|&(r, c, _)| (r, c));
        let mut row_start = vec![0; n + 1];
        let mut cols = Vec::with_capacity(triples.len());
        let mut values: Vec<f32> = Vec::with_capacity(triples.len());
        let mut last: Option<(u32, u32)> = None;
        for (r, c, v) in triples {
            if last == Some((r, c)) {
                *values.last_mut().expect("a value follows its key") += v;
                continue;
            }
            last = Some((r, c));
            cols.push(c);
            values.push(v);
            row_start[r as usize + 1] += 1;
        }
        for i in 0..n {
            row_start[i + 1] += row_start[i];
        }
        Csr {
            n,
            row_start,
            cols,
            values,
        }
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    pub fn row(&self, r: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let range = self.row_start[r]..self.row_start[r + 1];
        self.cols[range.clone()]
            .iter()
            .zip(&self.values[range])
            .map(|(&c, &v)| (c as usize, v))
    }

    /// `self · dense`.
    pub fn mul(&self, dense: &Array2<f32>) -> Array2<f32> {
        let mut out = Array2::<f32>::zeros((self.n, dense.ncols()));
        for (r, mut out_row) in out.axis_iter_mut(Axis(0)).enumerate() {
            for (c, v) in self.row(r) {
                out_row.scaled_add(v, &dense.row(c));
            }
        }
        out
    }
}

/// Orthonormalises the columns in place (modified Gram-Schmidt, twice for stability).
/// A column that collapses to zero is left zero.
pub fn orthonormalize(m: &mut Array2<f32>) {
    let k = m.ncols();
    for _pass in 0..2 {
        for j in 0..k {
            for i in 0..j {
                let (qi, mut qj) = m.multi_slice_mut((s![.., i], s![.., j]));
                let proj = qi.dot(&qj);
                qj.scaled_add(-proj, &qi);
            }
            let mut col = m.column_mut(j);
            let norm = col.dot(&col).sqrt();
            if norm > 1e-12 {
                col.mapv_inplace(|v| v / norm);
            } else {
                col.fill(0.0);
            }
        }
    }
}

/// Eigenvalues and eigenvectors (columns) of a small symmetric matrix by cyclic Jacobi
/// rotations, sorted by eigenvalue, largest first.
pub fn symmetric_eigen(a: &Array2<f64>) -> (Array1<f64>, Array2<f64>) {
    let n = a.nrows();
    let mut a = a.clone();
    let mut v = Array2::<f64>::eye(n);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[[i, j]].powi(2))
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                if a[[p, q]].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[[q, q]] - a[[p, p]]) / (2.0 * a[[p, q]]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[[k, p]], a[[k, q]]);
                    a[[k, p]] = c * akp - s * akq;
                    a[[k, q]] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[[p, k]], a[[q, k]]);
                    a[[p, k]] = c * apk - s * aqk;
                    a[[q, k]] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[[k, p]], v[[k, q]]);
                    v[[k, p]] = c * vkp - s * vkq;
                    v[[k, q]] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[[j, j]].total_cmp(&a[[i, i]]));
    let values = order.iter().map(|&i| a[[i, i]]).collect();
    let mut vectors = Array2::<f64>::zeros((n, n));
    for (to, &from) in order.iter().enumerate() {
        vectors.column_mut(to).assign(&v.column(from));
    }
    (values, vectors)
}

/// The `k` largest eigenpairs of a symmetric sparse matrix by randomised subspace
/// iteration (Halko, Martinsson & Tropp 2011): returns eigenvalues and an n × k matrix of
/// eigenvectors. Deterministic for a seed.
pub fn top_eigen(
    m: &Csr,
    k: usize,
    oversample: usize,
    iterations: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> (Array1<f64>, Array2<f32>) {
    let width = (k + oversample).min(m.n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut q = Array2::<f32>::from_shape_fn((m.n, width), |_| StandardNormal.sample(&mut rng));
    orthonormalize(&mut q);
    for i in 0..iterations {
        q = m.mul(&q);
        orthonormalize(&mut q);
        progress(i + 1, iterations);
    }
    let mq = m.mul(&q);
    let b: Array2<f64> = q.t().dot(&mq).mapv(f64::from);
    let b = (&b + &b.t()) / 2.0;
    let (values, vectors) = symmetric_eigen(&b);
    let k = k.min(width);
    let rotate: Array2<f32> = vectors.slice(s![.., ..k]).mapv(|v| v as f32);
    (values.slice(s![..k]).to_owned(), q.dot(&rotate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_known_eigenpairs() {
        let a = ndarray::arr2(&[[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]]);
        let (values, vectors) = symmetric_eigen(&a);
        let expected = [5.0, 3.0, 1.0];
        for (v, e) in values.iter().zip(expected) {
            assert!((v - e).abs() < 1e-9, "{values}");
        }
        for j in 0..3 {
            let x = vectors.column(j);
            let ax = a.dot(&x);
            for i in 0..3 {
                assert!((ax[i] - values[j] * x[i]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn randomised_eigen_matches_the_dominant_subspace() {
        // A block matrix with two clear communities has two large eigenvalues.
        let n = 60;
        let mut triples = Vec::new();
        for i in 0..n as u32 {
            for j in 0..n as u32 {
                if i != j && (i < 30) == (j < 30) {
                    triples.push((i, j, 1.0));
                }
            }
        }
        let m = Csr::from_triples(n, triples);
        let (values, vectors) = top_eigen(&m, 2, 6, 4, 1, |_, _| {});
        assert!(
            (values[0] - 29.0).abs() < 1e-3 && (values[1] - 29.0).abs() < 1e-3,
            "{values}"
        );
        // Members of a community share a direction.
        let unit = |i: usize| {
            let r = vectors.row(i).to_owned();
            let n = r.dot(&r).sqrt();
            r / n
        };
        assert!(unit(0).dot(&unit(10)) > 0.99);
        assert!(unit(0).dot(&unit(40)).abs() < 0.1);
    }

    #[test]
    fn csr_sums_duplicates_and_multiplies() {
        let m = Csr::from_triples(2, vec![(0, 1, 1.0), (0, 1, 2.0), (1, 0, 4.0)]);
        assert_eq!(m.nnz(), 2);
        let x = ndarray::arr2(&[[1.0f32], [10.0]]);
        assert_eq!(m.mul(&x), ndarray::arr2(&[[30.0], [4.0]]));
    }
}
