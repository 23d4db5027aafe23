//! Mean cross-entropy over positions, with PyTorch's `ignore_index = -100` mask.

use rayon::prelude::*;

use super::exp::exp;
use crate::error::{Error, Result};

/// Positions whose target is this are not scored (PyTorch's default `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Checks targets against the vocabulary and counts the scored positions.
pub fn count_scored(targets: &[i64], n_vocab: usize) -> Result<usize> {
    let mut n = 0;
    for &t in targets {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= n_vocab {
            return Err(Error::TokenOutOfRange { token: t, n_vocab });
        }
        n += 1;
    }
    if n == 0 {
        return Err(Error::invalid(
            "targets",
            "every position is masked (-100): nothing to score",
        ));
    }
    Ok(n)
}

/// For rows of `logits` (`[n_rows, n_vocab]`) and their targets: returns the sum of
/// `-log softmax(row)[target]` over scored rows and overwrites `logits` with
/// dL/dlogits of the mean loss over `n_scored` positions: `(softmax − onehot) / n_scored`
/// (zero for masked rows). Working in place keeps one block of rows in memory at a time.
/// The rows' losses are added in row order, so that the sum does not depend on how the
/// thread pool split the rows.
pub fn cross_entropy_in_place(
    logits: &mut [f32],
    n_vocab: usize,
    targets: &[i64],
    n_scored: usize,
) -> f64 {
    let inv_n = 1.0 / n_scored as f64;
    let losses: Vec<f64> = logits
        .par_chunks_mut(n_vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            if target == IGNORE_INDEX {
                row.fill(0.0);
                return 0.0;
            }
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let target_logit = row[target as usize];
            row.iter_mut().for_each(|v| *v = exp(*v - max));
            let sum = sum_f64(row);
            let loss = sum.ln() - (target_logit - max) as f64;
            let scale = (inv_n / sum) as f32;
            row.iter_mut().for_each(|v| *v *= scale);
            row[target as usize] -= inv_n as f32;
            loss
        })
        .collect();
    losses.iter().sum()
}

/// `Σ v` in f64, in 8 running sums (so that the loop vectorizes) added at the end.
fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for chunk in chunks {
        lanes
            .iter_mut()
            .zip(chunk)
            .for_each(|(s, &v)| *s += v as f64);
    }
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_gradient_of_a_spelled_out_case() {
        // Row 0: logits [0, ln 3] -> p = [1/4, 3/4]; target 1 -> loss ln(4/3).
        // Row 1 is masked.
        let mut logits = vec![0.0, 3f32.ln(), 5.0, -5.0];
        let targets = [1, IGNORE_INDEX];
        let n = count_scored(&targets, 2).unwrap();
        let loss = cross_entropy_in_place(&mut logits, 2, &targets, n);
        assert!((loss - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        assert!((logits[0] - 0.25).abs() < 1e-6 && (logits[1] + 0.25).abs() < 1e-6);
        assert_eq!(&logits[2..], &[0.0, 0.0]);
    }

    #[test]
    fn the_loss_does_not_depend_on_the_thread_count() {
        let (n_rows, n_vocab) = (97, 13);
        let logits: Vec<f32> = (0..n_rows * n_vocab)
            .map(|i| ((i * 7919 % 1000) as f32 / 97.0).sin() * 4.0)
            .collect();
        let targets: Vec<i64> = (0..n_rows as i64).map(|i| i * 5 % n_vocab as i64).collect();
        let loss_on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut logits = logits.clone();
            pool.install(|| cross_entropy_in_place(&mut logits, n_vocab, &targets, n_rows))
        };
        let one = loss_on(1);
        for threads in [2, 3, 5] {
            assert_eq!(
                loss_on(threads).to_bits(),
                one.to_bits(),
                "{threads} threads"
            );
        }
    }

    #[test]
    fn bad_targets_are_refused() {
        assert!(matches!(
            count_scored(&[3], 3),
            Err(Error::TokenOutOfRange { token: 3, .. })
        ));
        assert!(count_scored(&[-5], 3).is_err());
        assert!(count_scored(&[IGNORE_INDEX], 3).is_err());
    }
}
