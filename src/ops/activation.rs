//! SwiGLU (Shazeer, 2020), LLaMA's feed-forward gate: `a = silu(g) ⊙ u`, `silu(g) = g σ(g)`.

use rayon::prelude::*;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `a = silu(gate) ⊙ up`.
pub fn swiglu_forward(gate: &[f32], up: &[f32], a: &mut [f32]) {
    a.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(a, (&g, &u))| *a = g * sigmoid(g) * u);
}

/// `du = da ⊙ silu(g)`,  `dg = da ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))`. Overwrites `d_gate`, `d_up`.
pub fn swiglu_backward(da: &[f32], gate: &[f32], up: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    d_gate
        .par_iter_mut()
        .zip(d_up.par_iter_mut())
        .zip(da.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .for_each(|((dg, du), (&da, (&g, &u)))| {
            let s = sigmoid(g);
            *du = da * g * s;
            *dg = da * u * s * (1.0 + g * (1.0 - s));
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let (g, u, da) = ([0.7f32, -1.3], [1.5f32, 0.4], [0.3f32, -2.0]);
        let mut dg = [0f32; 2];
        let mut du = [0f32; 2];
        swiglu_backward(&da, &g, &u, &mut dg, &mut du);
        let f = |g: f32, u: f32| (g * sigmoid(g) * u) as f64;
        for i in 0..2 {
            let num_g = (f(g[i] + 1e-3, u[i]) - f(g[i] - 1e-3, u[i])) / 2e-3 * da[i] as f64;
            let num_u = (f(g[i], u[i] + 1e-3) - f(g[i], u[i] - 1e-3)) / 2e-3 * da[i] as f64;
            assert!(
                (dg[i] as f64 - num_g).abs() < 1e-3,
                "dg {} vs {num_g}",
                dg[i]
            );
            assert!(
                (du[i] as f64 - num_u).abs() < 1e-3,
                "du {} vs {num_u}",
                du[i]
            );
        }
        let mut a = [0f32; 1];
        swiglu_forward(&[1.0], &[2.0], &mut a);
        assert!((a[0] - 2.0 * 0.731_058_6).abs() < 1e-6);
    }
}
