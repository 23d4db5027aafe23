//! The one op that applies adapters: `y = W x + b + Σ_i s_i B_i (A_i x)`, and its backward.
//! Every projection of every forward (single, cached, pooled, batched, training) calls
//! `linear`; nothing else knows that LoRA exists.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::RwLockReadGuard;

use super::adapter::{LoraAdapter, LoraPair};
use super::Narrow;
use crate::model::{Proj, Slot};
use crate::ops::gemm::{add_row_dots, gemm, MatMut, MatRef, RowValue};
use crate::ops::{scratch, Numerics, Weight};

/// An adapter as one call sees it: read-locked, with one snapshot of alpha.
struct ActiveAdapter<'a> {
    adapter: &'a LoraAdapter,
    pairs: RwLockReadGuard<'a, Vec<LoraPair>>,
    alpha: f32,
}

/// An adapter and the user scale it is applied with.
pub type Scaled<'a> = (&'a LoraAdapter, f32);

/// The adapters of one forward call and the rows each applies to.
pub struct LoraPlan<'a> {
    adapters: Vec<ActiveAdapter<'a>>,
    segments: Vec<Segment>,
}

/// Rows of the batch, and the (index into `adapters`, user scale) applied to them.
type Segment = (Range<usize>, Vec<(usize, f32)>);

/// One adapter term on one slot: rows of the batch, pair, rows of B, factor.
pub struct Term<'p> {
    pub rows: Range<usize>,
    pub adapter: usize,
    pub pair: &'p LoraPair,
    pub pair_index: usize,
    /// The rows of the pair's B this slot reads (all of them but on fused tensors).
    pub b_rows: Range<usize>,
    pub scaling: f32,
}

impl Term<'_> {
    /// The slot's rows of B: `[n_out, rank]`.
    pub fn b(&self) -> &[f32] {
        let rank = self.pair.rank;
        &self.pair.lora_b[self.b_rows.start * rank..self.b_rows.end * rank]
    }

    /// Outputs of the slot.
    pub fn n_out(&self) -> usize {
        self.b_rows.len()
    }
}

impl<'a> LoraPlan<'a> {
    pub fn none() -> LoraPlan<'a> {
        LoraPlan {
            adapters: Vec::new(),
            segments: Vec::new(),
        }
    }

    /// `segments`: row ranges and the adapters applied to each, at the adapter's own scale.
    pub fn new(segments: Vec<(Range<usize>, Vec<&'a LoraAdapter>)>) -> LoraPlan<'a> {
        Self::scaled(
            segments
                .into_iter()
                .map(|(rows, list)| (rows, list.into_iter().map(|a| (a, a.scale())).collect()))
                .collect(),
        )
    }

    /// `new` with the user scale of each application given: one adapter may serve several
    /// segments at different scales (a server's requests). Each adapter is locked once.
    pub fn scaled(segments: Vec<(Range<usize>, Vec<Scaled<'a>>)>) -> LoraPlan<'a> {
        let mut adapters: Vec<ActiveAdapter<'a>> = Vec::new();
        let mut index_of: HashMap<*const LoraAdapter, usize> = HashMap::new();
        let segments = segments
            .into_iter()
            .map(|(rows, list)| {
                let applied = list
                    .into_iter()
                    .map(|(adapter, scale)| {
                        let index = *index_of.entry(adapter as *const _).or_insert_with(|| {
                            adapters.push(ActiveAdapter {
                                adapter,
                                pairs: adapter.pairs(),
                                alpha: adapter.alpha(),
                            });
                            adapters.len() - 1
                        });
                        (index, scale)
                    })
                    .collect();
                (rows, applied)
            })
            .collect();
        LoraPlan { adapters, segments }
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// The plan of the batch made of `rows` of this one, in that order: its row `i` takes
    /// the adapters of row `rows[i]`.
    pub fn select_rows(&mut self, rows: &[usize]) {
        let mut segments: Vec<Segment> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let Some((_, applied)) = self.segments.iter().find(|(r, _)| r.contains(row)) else {
                continue;
            };
            match segments.last_mut() {
                Some((r, last)) if r.end == i && last == applied => r.end += 1,
                _ => segments.push((i..i + 1, applied.clone())),
            }
        }
        self.segments = segments;
    }

    pub fn adapter(&self, index: usize) -> &'a LoraAdapter {
        self.adapters[index].adapter
    }

    pub fn n_adapters(&self) -> usize {
        self.adapters.len()
    }

    /// Whether a trainable adapter has a term on one of `projs` of layer `layer`.
    pub fn trains(&self, layer: usize, projs: &[Proj]) -> bool {
        projs.iter().any(|&proj| {
            self.terms(Slot { layer, proj })
                .any(|term| self.adapter(term.adapter).trainable())
        })
    }

    /// Every adapter term on `slot`.
    pub fn terms(&self, slot: Slot) -> impl Iterator<Item = Term<'_>> {
        self.segments.iter().flat_map(move |(rows, applied)| {
            applied.iter().filter_map(move |&(i, scale)| {
                let active = &self.adapters[i];
                let pair_index = active.adapter.pair_index(slot)?;
                let pair = &active.pairs[pair_index];
                Some(Term {
                    rows: rows.clone(),
                    adapter: i,
                    pair,
                    pair_index,
                    b_rows: pair.b_rows(slot.proj)?,
                    scaling: LoraAdapter::scaling(
                        active.adapter.rule,
                        pair.alpha.unwrap_or(active.alpha),
                        scale,
                        pair.rank,
                    ),
                })
            })
        })
    }
}

fn rows_of<'d>(data: &'d [f32], rows: &Range<usize>, width: usize) -> MatRef<'d> {
    MatRef::new(
        &data[rows.start * width..rows.end * width],
        rows.len(),
        width,
    )
}

/// `u = x[rows] Aᵀ · scaling` into `scratch` (`[n_rows, rank]`).
fn lora_hidden<'s>(x: &[f32], term: &Term, scratch: &'s mut Vec<f32>) -> &'s mut [f32] {
    let pair = term.pair;
    scratch.resize(term.rows.len() * pair.rank, 0.0);
    let u = &mut scratch[..];
    gemm(
        rows_of(x, &term.rows, pair.n_in),
        MatRef::new(&pair.lora_a, pair.rank, pair.n_in).t(),
        MatMut::new(u, term.rows.len(), pair.rank),
        false,
        false,
    );
    u.iter_mut().for_each(|v| *v *= term.scaling);
    u
}

/// `y += s B (A x)` for one token `x`, by dot products: for one token, a gemm's packing and
/// dispatch cost more than the work. The factors are read as narrow as they are held exactly.
fn add_term_of_one_token(x: &[f32], term: &Term, u: &mut Vec<f32>, y: &mut [f32]) {
    let (pair, scaling) = (term.pair, term.scaling);
    let b_values = term.b_rows.start * pair.rank..term.b_rows.end * pair.rank;
    match pair.narrow() {
        Some(Narrow::F16 { a, b }) => add_low_rank(a, &b[b_values], x, scaling, u, y),
        Some(Narrow::Bf16 { a, b }) => add_low_rank(a, &b[b_values], x, scaling, u, y),
        None => add_low_rank(&pair.lora_a, term.b(), x, scaling, u, y),
    }
}

/// `y += s B (A x)` for `A [u.len(), x.len()]` and `B [y.len(), u.len()]`, `u` sized here.
fn add_low_rank<V: RowValue>(
    a: &[V],
    b: &[V],
    x: &[f32],
    scaling: f32,
    u: &mut Vec<f32>,
    y: &mut [f32],
) {
    u.clear();
    u.resize(a.len() / x.len(), 0.0);
    add_row_dots(a, x, u);
    u.iter_mut().for_each(|u| *u *= scaling);
    add_row_dots(b, u, y);
}

/// `Σ s B (A x)` of every term on `slot`, each on its rows of `x`, into `delta`
/// (`[n_tokens, n_out]`, zero where no term applies).
fn adapter_terms(x: &[f32], lora: &LoraPlan, slot: Slot, delta: &mut [f32]) {
    delta.fill(0.0);
    scratch::with_f32(|u| {
        for term in lora.terms(slot) {
            let (rows, pair, n_out) = (term.rows.clone(), term.pair, term.n_out());
            let delta = &mut delta[rows.start * n_out..rows.end * n_out];
            if rows.len() == 1 {
                let x = &x[rows.start * pair.n_in..rows.end * pair.n_in];
                add_term_of_one_token(x, &term, u, delta);
                continue;
            }
            let u = lora_hidden(x, &term, u);
            gemm(
                MatRef::new(u, rows.len(), pair.rank),
                MatRef::new(term.b(), n_out, pair.rank).t(),
                MatMut::new(delta, rows.len(), n_out),
                true,
                true,
            );
        }
    })
}

/// `y = x Wᵀ + b + Σ s B (A x)` for the rows of `x` (`[n_tokens, n_in]`), `y` `[n_tokens, n_out]`;
/// the adapter terms are summed in `delta` first.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    weight: &Weight,
    bias: Option<&[f32]>,
    slot: Slot,
    lora: &LoraPlan,
    numerics: Numerics,
    y: &mut [f32],
    delta: &mut Vec<f32>,
) {
    let base = |y: &mut [f32]| {
        weight.product(numerics, x, y);
        if let Some(bias) = bias {
            for row in y.chunks_mut(weight.n_rows) {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            }
        }
    };
    if lora.terms(slot).next().is_none() {
        return base(y);
    }
    // A decode step's terms are a few short products, each thread's share of the weight's
    // product not much more: another thread takes them while the product runs.
    delta.resize(y.len(), 0.0);
    rayon::join(|| base(y), || adapter_terms(x, lora, slot, delta));
    y.iter_mut().zip(&*delta).for_each(|(y, d)| *y += d);
}

/// Gradients for the pairs of trainable adapters, keyed by (adapter in plan, pair index).
#[derive(Default)]
pub struct LoraGrads {
    pub grads: HashMap<(usize, usize), (Vec<f32>, Vec<f32>)>,
}

/// Backward of `linear` (frozen `W` and `b`). With `u = s · A x`, `g = dy B`:
///   dB += dyᵀ u,   dA += s · gᵀ x,   dx += dy W + s · g A.
/// Gradients go only to trainable adapters; `dx` accumulates, where one is asked for.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dy: &[f32],
    x: &[f32],
    weight: &Weight,
    slot: Slot,
    lora: &LoraPlan,
    numerics: Numerics,
    mut dx: Option<&mut [f32]>,
    grads: &mut LoraGrads,
    scratch: &mut Vec<f32>,
) {
    if let Some(dx) = dx.as_deref_mut() {
        weight.backward_input(numerics, dy, dx);
    }
    let mut g = Vec::new();
    for term in lora.terms(slot) {
        let trainable = lora.adapter(term.adapter).trainable();
        if !trainable && dx.is_none() {
            continue;
        }
        let (rows, pair, n_out) = (term.rows.clone(), term.pair, term.n_out());
        let n = rows.len();
        let dy_rows = rows_of(dy, &rows, n_out);
        // g = dy B : [n, rank]
        g.resize(n * pair.rank, 0.0);
        gemm(
            dy_rows,
            MatRef::new(term.b(), n_out, pair.rank),
            MatMut::new(&mut g, n, pair.rank),
            false,
            false,
        );
        g.iter_mut().for_each(|v| *v *= term.scaling);
        if trainable {
            let u = lora_hidden(x, &term, scratch);
            let (d_a, d_b) = grads
                .grads
                .entry((term.adapter, term.pair_index))
                .or_insert_with(|| (vec![0.0; pair.lora_a.len()], vec![0.0; pair.lora_b.len()]));
            // dB [n_out, rank] += dyᵀ [n_out, n] · u [n, rank], in the slot's rows of B
            let d_b = &mut d_b[term.b_rows.start * pair.rank..term.b_rows.end * pair.rank];
            gemm(
                dy_rows.t(),
                MatRef::new(u, n, pair.rank),
                MatMut::new(d_b, n_out, pair.rank),
                true,
                true,
            );
            // dA [rank, n_in] += gᵀ [rank, n] · x [n, n_in]
            gemm(
                MatRef::new(&g, n, pair.rank).t(),
                rows_of(x, &rows, pair.n_in),
                MatMut::new(d_a, pair.rank, pair.n_in),
                true,
                true,
            );
        }
        // dx[rows] += g A
        let Some(dx) = dx.as_deref_mut() else {
            continue;
        };
        let dx_rows = &mut dx[rows.start * pair.n_in..rows.end * pair.n_in];
        gemm(
            MatRef::new(&g, n, pair.rank),
            MatRef::new(&pair.lora_a, pair.rank, pair.n_in),
            MatMut::new(dx_rows, n, pair.n_in),
            true,
            true,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{ByteView, TensorType};
    use crate::lora::{AdapterFormat, ScalingRule};

    fn adapter() -> LoraAdapter {
        let (format, rule) = (AdapterFormat::Trainable, ScalingRule::AlphaOverRank);
        LoraAdapter::new("llama".into(), format, rule, 1.0, 1.0, Vec::new())
    }

    /// Values in [-1, 1) from a multiplicative hash of `seed` and the index.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 8) as f32 / 8_388_608.0 - 1.0
            })
            .collect()
    }

    /// An f32 weight `[n_out, n_in]` holding `w`.
    fn f32_weight(w: &[f32], n_out: usize, n_in: usize) -> Weight {
        let bytes = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        Weight::new("w", TensorType::F32, n_out, n_in, ByteView::from_vec(bytes)).unwrap()
    }

    #[test]
    fn tokens_alone_and_in_runs_get_every_adapter_term() {
        // Widths that take the 8-row dot kernel and its tail; rank 8 takes it for B as well.
        let (n_in, n_out, rank) = (24, 20, 8);
        let slot = Slot {
            layer: 0,
            proj: Proj::AttnQ,
        };
        let w = values(n_out * n_in, 1);
        let weight = f32_weight(&w, n_out, n_in);
        let make = |seed: u32, alpha: f32| {
            let (a, b) = (values(rank * n_in, seed), values(n_out * rank, seed + 1));
            let pair = LoraPair::of_layer_0(Proj::AttnQ, rank, a, b);
            let (format, rule) = (AdapterFormat::Trainable, ScalingRule::AlphaOverRank);
            LoraAdapter::new("llama".into(), format, rule, alpha, 1.0, vec![pair])
        };
        let (a, b) = (make(2, 16.0), make(4, 4.0));
        // Token 0 alone with both adapters, tokens 1-3 a run with one, token 4 alone with the
        // other at half scale, token 5 without.
        let segments = vec![
            (0..1, vec![(&a, 1.0), (&b, 1.0)]),
            (1..4, vec![(&a, 1.0)]),
            (4..5, vec![(&b, 0.5)]),
        ];
        let applied: Vec<Vec<(&LoraAdapter, f64)>> = vec![
            vec![(&a, 2.0), (&b, 0.5)],
            vec![(&a, 2.0)],
            vec![(&a, 2.0)],
            vec![(&a, 2.0)],
            vec![(&b, 0.25)],
            vec![],
        ];
        let x = values(applied.len() * n_in, 9);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut y = vec![0f32; applied.len() * n_out];
        pool.install(|| {
            let plan = LoraPlan::scaled(segments);
            linear(
                &x,
                &weight,
                None,
                slot,
                &plan,
                Numerics::Exact,
                &mut y,
                &mut Vec::new(),
            );
        });
        for (t, applied) in applied.iter().enumerate() {
            let x = &x[t * n_in..(t + 1) * n_in];
            let dot = |row: &[f32], v: &[f64]| -> f64 {
                row.iter().zip(v).map(|(&r, &v)| r as f64 * v).sum()
            };
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut expected: Vec<f64> = w.chunks(n_in).map(|row| dot(row, &x64)).collect();
            for &(adapter, scaling) in applied {
                let pair = &adapter.pairs()[0];
                let u: Vec<f64> = pair.lora_a.chunks(n_in).map(|row| dot(row, &x64)).collect();
                for (e, row) in expected.iter_mut().zip(pair.lora_b.chunks(rank)) {
                    *e += scaling * dot(row, &u);
                }
            }
            for (o, (&got, want)) in y[t * n_out..(t + 1) * n_out]
                .iter()
                .zip(expected)
                .enumerate()
            {
                assert!(
                    (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "token {t} output {o}: {got} vs {want}"
                );
            }
        }
    }

    /// One token's terms read an f16-exact adapter in f16, and the values written after
    /// that, not the stale copy.
    #[test]
    fn a_token_reads_the_narrow_copy_until_the_values_change() {
        let (n_in, n_out, rank) = (16, 8, 8);
        let slot = Slot {
            layer: 0,
            proj: Proj::AttnV,
        };
        let weight = f32_weight(&vec![0.0; n_out * n_in], n_out, n_in);
        let to_f16 = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter()
                .map(|v| half::f16::from_f32(v).to_f32())
                .collect()
        };
        let (a, b) = (values(rank * n_in, 3), values(n_out * rank, 5));
        let pair = LoraPair::of_layer_0(Proj::AttnV, rank, to_f16(a), to_f16(b));
        let (format, rule) = (AdapterFormat::Gguf, ScalingRule::AlphaOverRank);
        let adapter = LoraAdapter::new("llama".into(), format, rule, 8.0, 1.0, vec![pair]);
        let x = values(n_in, 7);
        let run = || {
            let mut y = vec![0f32; n_out];
            let plan = LoraPlan::new(vec![(0..1, vec![&adapter])]);
            let (w, numerics) = (&weight, Numerics::Exact);
            linear(&x, w, None, slot, &plan, numerics, &mut y, &mut Vec::new());
            y
        };
        let expected = |adapter: &LoraAdapter| -> Vec<f64> {
            let pair = &adapter.pairs()[0];
            let dot = |row: &[f32], v: &[f32]| -> f64 {
                row.iter().zip(v).map(|(&r, &v)| r as f64 * v as f64).sum()
            };
            let u: Vec<f32> = pair
                .lora_a
                .chunks(n_in)
                .map(|r| dot(r, &x) as f32)
                .collect();
            pair.lora_b.chunks(rank).map(|r| dot(r, &u)).collect()
        };
        let close = |y: &[f32], e: &[f64]| {
            y.iter()
                .zip(e)
                .all(|(&y, &e)| (y as f64 - e).abs() < 1e-5 * (1.0 + e.abs()))
        };
        let before = run();
        assert!(matches!(
            adapter.pairs()[0].narrow(),
            Some(Narrow::F16 { .. })
        ));
        assert!(close(&before, &expected(&adapter)), "{before:?}");
        adapter.pairs_mut()[0]
            .lora_b
            .iter_mut()
            .for_each(|b| *b += 0.1);
        let after = run();
        assert!(adapter.pairs()[0].narrow().is_none());
        assert!(close(&after, &expected(&adapter)), "{after:?}");
    }

    #[test]
    fn selected_rows_keep_their_adapters_renumbered() {
        let (a, b) = (adapter(), adapter());
        let mut plan = LoraPlan::scaled(vec![
            (0..3, vec![(&a, 1.0)]),
            (5..8, vec![(&a, 1.0), (&b, 0.5)]),
            (8..9, vec![(&a, 1.0), (&b, 0.5)]),
            (9..10, vec![(&b, 0.5)]),
        ]);
        // Rows 3 and 4 have no adapter; 7 and 8 lie in two segments applying the same.
        plan.select_rows(&[1, 2, 4, 7, 8, 9]);
        let both = vec![(0, 1.0), (1, 0.5)];
        let expected: Vec<Segment> =
            vec![(0..2, vec![(0, 1.0)]), (3..5, both), (5..6, vec![(1, 0.5)])];
        assert_eq!(plan.segments, expected);
    }
}
