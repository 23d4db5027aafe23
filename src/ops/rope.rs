//! Rotary position embeddings (Su et al., 2021), in the two layouts GGUF models use.

use rayon::prelude::*;

/// Which dimensions of a head are rotated together. Choosing the wrong one fails silently
/// (plausible but wrong logits), so it is fixed per architecture, never guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp's "normal" mode. LLaMA GGUFs are stored this way because
    /// `convert_hf_to_gguf.py` permutes the rows of q and k from HF's half-split order.
    Normal,
    /// Pairs `(i, i + n_rot/2)`: GPT-NeoX and HF order, used by Qwen2 (rows not permuted).
    Neox,
}

/// The rotation: `n_rot` leading dimensions of each head turn by `pos · freq_scale · θ_i`,
/// `θ_i = base^(-2i/n_rot) / factor_i`.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    pub head_dim: usize,
    pub n_rot: usize,
    pub freq_base: f32,
    /// Linear position scaling (1 / `rope.scaling.factor`).
    pub freq_scale: f32,
    /// Per-pair frequency divisors (`rope_freqs.weight`, Llama 3.1; LongRoPE's chosen set).
    pub freq_factors: Option<Vec<f32>>,
    /// Factor on cos and sin (`rope.scaling.attn_factor`: LongRoPE's attention scaling).
    pub mscale: f32,
    /// Phi-3's LongRoPE, whose frequency factors depend on the context (see `for_context`).
    pub long_rope: Option<LongRope>,
    /// The rotation of sliding-window layers where it differs (Gemma 3's own base).
    pub swa: Option<Box<Rope>>,
}

/// LongRoPE's two sets of frequency divisors (`rope_factors_short`, `rope_factors_long`):
/// the short set for contexts up to `n_ctx_orig`, the long one beyond.
#[derive(Debug, Clone)]
pub struct LongRope {
    pub short: Vec<f32>,
    pub long: Vec<f32>,
    pub n_ctx_orig: usize,
}

/// cos and sin of every rotation angle for a run of positions: `[n_pos, n_rot / 2]`, and
/// those of the sliding-window layers where their rotation differs.
#[derive(Default)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    swa: Option<Box<RopeTable>>,
}

impl RopeTable {
    /// (cos, sin), each `[n_pos, n_rot / 2]`.
    pub fn parts(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// The table of a layer (`sliding`: a sliding-window one).
    pub fn for_layer(&self, sliding: bool) -> &RopeTable {
        match (&self.swa, sliding) {
            (Some(swa), true) => swa,
            _ => self,
        }
    }
}

impl Rope {
    /// The RoPE of an inference of `n_ctx` positions: LongRoPE's factor set chosen by the
    /// context size, as llama.cpp chooses it (not by the length of each sequence).
    pub fn for_context(&self, n_ctx: usize) -> Rope {
        let mut rope = self.clone();
        if let Some(long_rope) = &self.long_rope {
            rope.freq_factors = Some(match n_ctx > long_rope.n_ctx_orig {
                true => long_rope.long.clone(),
                false => long_rope.short.clone(),
            });
        }
        rope
    }

    /// Angles computed in f64 and rounded once, so long positions keep their precision.
    pub fn table(&self, positions: impl Iterator<Item = usize> + Clone, table: &mut RopeTable) {
        if let Some(swa) = &self.swa {
            swa.table(
                positions.clone(),
                table.swa.get_or_insert_with(Default::default),
            );
        }
        let half = self.n_rot / 2;
        table.cos.clear();
        table.sin.clear();
        for pos in positions {
            for i in 0..half {
                let mut theta = (self.freq_base as f64).powf(-2.0 * i as f64 / self.n_rot as f64);
                if let Some(factors) = &self.freq_factors {
                    theta /= factors[i] as f64;
                }
                let angle = pos as f64 * self.freq_scale as f64 * theta;
                table.cos.push((angle.cos() * self.mscale as f64) as f32);
                table.sin.push((angle.sin() * self.mscale as f64) as f32);
            }
        }
    }

    /// Rotates, in place, every head of every row of `x` (`[n_tokens, n_heads * head_dim]`);
    /// row `t` uses row `t` of `table`. `inverse` applies the transposed map (rotates back,
    /// times `mscale`): the backward pass.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, table: &RopeTable, inverse: bool) {
        let half = self.n_rot / 2;
        let row_len = n_heads * self.head_dim;
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(row_len).enumerate().for_each(|(t, row)| {
            let cos = &table.cos[t * half..(t + 1) * half];
            let sin = &table.sin[t * half..(t + 1) * half];
            for head in row.chunks_mut(self.head_dim) {
                for i in 0..half {
                    let (a, b) = match self.style {
                        RopeStyle::Normal => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    let (c, s) = (cos[i], sign * sin[i]);
                    head[a] = x0 * c - x1 * s;
                    head[b] = x0 * s + x1 * c;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(style: RopeStyle) -> Rope {
        Rope {
            style,
            head_dim: 4,
            n_rot: 4,
            freq_base: 10000.0,
            freq_scale: 1.0,
            freq_factors: None,
            mscale: 1.0,
            long_rope: None,
            swa: None,
        }
    }

    #[test]
    fn normal_style_rotates_adjacent_pairs() {
        let r = rope(RopeStyle::Normal);
        let mut table = RopeTable::default();
        r.table([1usize].into_iter(), &mut table);
        let mut x = [1.0f32, 0.0, 1.0, 0.0];
        r.apply(&mut x, 1, &table, false);
        // pair 0 turns by 1 rad, pair 1 by 1/100 rad
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        assert!((x[2] - 0.01f32.cos()).abs() < 1e-6 && (x[3] - 0.01f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn neox_style_rotates_halves_and_inverse_undoes_it() {
        let r = rope(RopeStyle::Neox);
        let mut table = RopeTable::default();
        r.table([3usize].into_iter(), &mut table);
        let original = [0.5f32, -1.0, 2.0, 0.25];
        let mut x = original;
        r.apply(&mut x, 1, &table, false);
        let c = 3f32.cos();
        let s = 3f32.sin();
        assert!((x[0] - (0.5 * c - 2.0 * s)).abs() < 1e-6);
        assert!((x[2] - (0.5 * s + 2.0 * c)).abs() < 1e-6);
        r.apply(&mut x, 1, &table, true);
        for (a, b) in x.iter().zip(&original) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
