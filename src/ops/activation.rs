//! Gated feed-forward activations (Shazeer, 2020): SwiGLU, LLaMA's `a = silu(g) ⊙ u` with
//! `silu(g) = g σ(g)`, and GeGLU, Gemma's `a = gelu(g) ⊙ u` with GELU's tanh approximation.

use rayon::prelude::*;

use super::exp::exp;

/// Values per parallel task: plain loops over chunks vectorize (`exp` has no branches).
const CHUNK: usize = 4096;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `a = silu(gate) ⊙ up`.
pub fn swiglu_forward(gate: &[f32], up: &[f32], a: &mut [f32]) {
    a.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(a, (gate, up))| {
            for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                *a = g * sigmoid(g) * u;
            }
        });
}

/// `du = da ⊙ silu(g)`,  `dg = da ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))`. Overwrites `d_gate`, `d_up`.
pub fn swiglu_backward(da: &[f32], gate: &[f32], up: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(
            da.par_chunks(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))),
        )
        .for_each(|((d_gate, d_up), (da, (gate, up)))| {
            for ((dg, du), ((&da, &g), &u)) in d_gate
                .iter_mut()
                .zip(d_up.iter_mut())
                .zip(da.iter().zip(gate).zip(up))
            {
                let s = sigmoid(g);
                *du = da * g * s;
                *dg = da * u * s * (1.0 + g * (1.0 - s));
            }
        });
}

/// √(2/π), GELU's tanh-approximation constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBE: f32 = 0.044_715;

/// `gelu(g) = g/2 · (1 + tanh(√(2/π) (g + 0.044715 g³)))` and its derivative.
fn gelu_tanh(g: f32) -> (f32, f32) {
    let inner = SQRT_2_OVER_PI * (g + GELU_CUBE * g * g * g);
    let t = inner.tanh();
    let value = 0.5 * g * (1.0 + t);
    let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBE * g * g);
    (value, 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner)
}

/// `a = gelu(gate) ⊙ up`.
pub fn geglu_forward(gate: &[f32], up: &[f32], a: &mut [f32]) {
    a.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(a, (&g, &u))| *a = gelu_tanh(g).0 * u);
}

/// `du = da ⊙ gelu(g)`, `dg = da ⊙ u ⊙ gelu'(g)`. Overwrites `d_gate`, `d_up`.
pub fn geglu_backward(da: &[f32], gate: &[f32], up: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    d_gate
        .par_iter_mut()
        .zip(d_up.par_iter_mut())
        .zip(da.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .for_each(|((dg, du), (&da, (&g, &u)))| {
            let (value, slope) = gelu_tanh(g);
            *du = da * value;
            *dg = da * u * slope;
        });
}

/// `x ← c · tanh(x / c)` (Gemma 2's soft-capping of logits).
pub fn softcap(x: &mut [f32], cap: f32) {
    x.par_iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// `d ← d · (1 − (y / c)²)`: from dL/d(capped) to dL/d(raw), with `y` the capped values.
pub fn softcap_backward(d: &mut [f32], capped: &[f32], cap: f32) {
    d.par_iter_mut()
        .zip(capped.par_iter())
        .for_each(|(d, &y)| *d *= 1.0 - (y / cap) * (y / cap));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gated activation's backward: `(da, g, u, dg, du)`.
    type Backward = fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]);

    /// A gated activation's backward against central differences of `value(g) · u`.
    fn check_backward(value: impl Fn(f32) -> f32, backward: Backward) {
        let (g, u, da) = ([0.7f32, -1.3], [1.5f32, 0.4], [0.3f32, -2.0]);
        let (mut dg, mut du) = ([0f32; 2], [0f32; 2]);
        backward(&da, &g, &u, &mut dg, &mut du);
        let f = |g: f32, u: f32| (value(g) * u) as f64;
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
    }

    #[test]
    fn backward_matches_finite_differences() {
        check_backward(|g| g * sigmoid(g), swiglu_backward);
        let mut a = [0f32; 1];
        swiglu_forward(&[1.0], &[2.0], &mut a);
        assert!((a[0] - 2.0 * 0.731_058_6).abs() < 1e-6);
    }

    #[test]
    fn geglu_backward_matches_finite_differences() {
        check_backward(|g| gelu_tanh(g).0, geglu_backward);
        // gelu(1) with the tanh approximation (PyTorch's gelu(approximate="tanh")).
        assert!((gelu_tanh(1.0).0 - 0.841_192).abs() < 1e-5);
    }
}
