//! RMSNorm (Zhang & Sennrich, 2019) as LLaMA uses it: `y = x / sqrt(mean(x²) + eps) ⊙ w`.

use rayon::prelude::*;

/// Normalises each row of `x` (rows of `weight.len()`), writing `y` and, for the backward,
/// each row's `1 / rms` into `inv_rms`.
pub fn rms_norm_forward(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32], inv_rms: &mut [f32]) {
    let n = weight.len();
    x.par_chunks(n)
        .zip(inv_rms.par_iter_mut())
        .for_each(|(x, inv)| {
            // Sum in f64 as ggml does: rows of thousands of squares lose bits in f32.
            let mean_sq = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n as f64;
            *inv = (1.0 / (mean_sq + eps as f64).sqrt()) as f32;
        });
    rms_norm_apply(x, weight, inv_rms, y);
}

/// `y = x · inv_rms[row] ⊙ w`: the normalisation with known scales (recomputing a forward).
pub fn rms_norm_apply(x: &[f32], weight: &[f32], inv_rms: &[f32], y: &mut [f32]) {
    let n = weight.len();
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .zip(inv_rms.par_iter())
        .for_each(|((y, x), &inv)| {
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                *y = x * inv * w;
            }
        });
}

/// `rms_norm_forward` without keeping the per-row scale.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
    let mut inv_rms = vec![0f32; x.len() / weight.len()];
    rms_norm_forward(x, weight, eps, y, &mut inv_rms);
}

/// With x̂ = x·r (r = 1/rms) and dx̂ = dy ⊙ w:  dx += r · (dx̂ − x̂ · mean(dx̂ ⊙ x̂)).
/// (The weight is frozen: no dw.)
pub fn rms_norm_backward(dy: &[f32], x: &[f32], weight: &[f32], inv_rms: &[f32], dx: &mut [f32]) {
    let n = weight.len();
    dx.par_chunks_mut(n)
        .zip(dy.par_chunks(n).zip(x.par_chunks(n)))
        .zip(inv_rms.par_iter())
        .for_each(|((dx, (dy, x)), &r)| {
            let dot: f64 = dy
                .iter()
                .zip(x)
                .zip(weight)
                .map(|((&dy, &x), &w)| (dy * w) as f64 * (x * r) as f64)
                .sum();
            let mean = (dot / n as f64) as f32;
            for (((dx, &dy), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(weight) {
                *dx += r * (dy * w - x * r * mean);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_matches_spelled_out_values() {
        // mean(x²) = (9 + 16) / 2 = 12.5, 1/rms = 0.28284271
        let mut y = [0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut y);
        assert!((y[0] - 0.848_528_1).abs() < 1e-6 && (y[1] - 2.262_741_7).abs() < 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = [0.3f32, -1.2, 0.7, 2.0];
        let w = [1.1f32, 0.9, -0.5, 1.3];
        let dy = [0.2f32, -0.4, 1.0, 0.1];
        let loss = |x: &[f32]| {
            let mut y = [0f32; 4];
            rms_norm(x, &w, 1e-5, &mut y);
            y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut y = [0f32; 4];
        let mut inv = [0f32; 1];
        rms_norm_forward(&x, &w, 1e-5, &mut y, &mut inv);
        let mut dx = [0f32; 4];
        rms_norm_backward(&dy, &x, &w, &inv, &mut dx);
        for i in 0..4 {
            let (mut plus, mut minus) = (x, x);
            plus[i] += 1e-3;
            minus[i] -= 1e-3;
            let numeric = (loss(&plus) - loss(&minus)) / 2e-3;
            assert!(
                (dx[i] as f64 - numeric).abs() < 1e-3,
                "dx[{i}] {} vs {numeric}",
                dx[i]
            );
        }
    }
}
