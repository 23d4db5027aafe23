//! Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p
//! (applied in that order, as Hugging Face's generation does), from a seeded generator.

use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// The id of the largest logit (NaN never wins; ties go to the lowest id).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Sampling settings and the generator they draw from.
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: StdRng,
}

impl Sampler {
    /// `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 switch those filters off; `seed`
    /// makes draws repeatable (None: from the OS).
    pub fn new(temperature: f32, top_k: usize, top_p: f32, seed: Option<u64>) -> Result<Sampler> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("{temperature} must be >= 0"),
            ));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("{top_p} must be in (0, 1]"),
            ));
        }
        Ok(Sampler {
            temperature,
            top_k,
            top_p,
            rng: match seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            },
        })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        // Candidates by decreasing logit, cut to top-k.
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        let k = if self.top_k == 0 {
            order.len()
        } else {
            self.top_k.min(order.len())
        };
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let Some(&first) = order.first() else {
            return argmax(logits);
        };
        let max = logits[first as usize] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / self.temperature as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Top-p: the smallest prefix whose mass reaches top_p.
        let mut kept = probs.len();
        if self.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.top_p as f64 {
                    kept = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..kept].iter().sum();
        let mut draw = Uniform::new(0.0, mass).map_or(0.0, |u| u.sample(&mut self.rng));
        for (i, p) in probs[..kept].iter().enumerate() {
            if draw < *p {
                return order[i];
            }
            draw -= p;
        }
        order[kept - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters_pick_what_they_should() {
        let logits = [0.1, 3.0, f32::NAN, 2.9, -1.0];
        assert_eq!(argmax(&logits), 1);
        let mut greedy = Sampler::new(0.0, 0, 1.0, Some(1)).unwrap();
        assert_eq!(greedy.sample(&logits), 1);
        let mut top1 = Sampler::new(1.0, 1, 1.0, Some(1)).unwrap();
        assert!((0..50).all(|_| top1.sample(&logits) == 1));
        // top_p 0.5: only the largest probability (≈0.5 of the mass) is kept.
        let mut nucleus = Sampler::new(1.0, 0, 0.5, Some(2)).unwrap();
        assert!((0..50).all(|_| nucleus.sample(&logits) == 1));
        let mut two = Sampler::new(1.0, 2, 1.0, Some(3)).unwrap();
        let draws: Vec<u32> = (0..200).map(|_| two.sample(&logits)).collect();
        assert!(
            draws.contains(&1) && draws.contains(&3) && draws.iter().all(|&d| d == 1 || d == 3)
        );
    }

    #[test]
    fn seeds_repeat() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(0.8, 40, 0.95, Some(seed)).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
