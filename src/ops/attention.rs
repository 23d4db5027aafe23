//! Causal softmax attention with grouped-query heads, forward and backward; optionally
//! soft-capped scores (`c · tanh(s / c)`) and a sliding window (Gemma).
//!
//! Shapes (one sequence): queries `[n_tokens, n_head * head_dim]` at positions
//! `pos0 .. pos0 + n_tokens`; keys and values `[n_keys, n_head_kv * head_dim]` for positions
//! `0 .. n_keys`; query head `h` reads key/value head `h / (n_head / n_head_kv)`.
//!
//! Inference's cached keys and values are f32 or f16 (`KvElem`); f16 ones are widened as
//! they are loaded, so every sum runs in f32, in the same order as on f32 rows.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use super::disjoint::SyncPtr;
use super::exp::exp;
use super::gemm::{dot, gemm, MatMut, MatRef};
use super::scratch;

#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Factor on `q · k` (usually 1/√head_dim).
    pub scale: f32,
    /// Scores become `c · tanh(s / c)` (Gemma 2).
    pub softcap: Option<f32>,
    /// A query at position `p` sees keys `p + 1 - window ..= p` only.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// The score of a raw product `q · k`.
    #[inline]
    fn score(&self, dot: f32) -> f32 {
        let s = self.scale * dot;
        match self.softcap {
            Some(c) => c * (s / c).tanh(),
            None => s,
        }
    }

    /// Raw products become scores, in place; without a soft cap the loop vectorizes.
    #[inline(always)]
    fn score_all(&self, s: &mut [f32]) {
        match self.softcap {
            Some(_) => s.iter_mut().for_each(|x| *x = self.score(*x)),
            None => s.iter_mut().for_each(|x| *x *= self.scale),
        }
    }

    /// d(score)/d(dot), from the score.
    #[inline]
    fn score_slope(&self, score: f32) -> f32 {
        match self.softcap {
            Some(c) => self.scale * (1.0 - (score / c) * (score / c)),
            None => self.scale,
        }
    }

    /// The first key a query at position `pos` sees.
    #[inline]
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    fn kv_head(&self, head: usize) -> usize {
        head / (self.n_head / self.n_head_kv)
    }
}

/// What cached keys and values are stored as: f32, or f16 (llama.cpp's default cache type:
/// half the bytes to read per decoded token at long contexts). Widening is exact, so
/// attention over f16 rows gives the bits it gives over f32 rows of the same values.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    /// `src` rounded into `dst` (f16: to nearest, ties to even, as llama.cpp stores them).
    fn round_from(dst: &mut [Self], src: &[f32]);

    /// `x` rounded as `round_from` rounds it.
    fn round(x: f32) -> Self;

    fn widen(self) -> f32;

    /// The first `N` values of `src`, widened. `AVX`: the caller's target features include
    /// AVX2 and F16C.
    fn widen_n<const AVX: bool, const N: usize>(src: &[Self]) -> [f32; N];

    /// The first 8 values of `src`, widened into a register.
    ///
    /// # Safety
    /// AVX and F16C; `src.len() >= 8`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(src: &[Self]) -> core::arch::x86_64::__m256;

    /// The first 16 values of `src`, widened into a register.
    ///
    /// # Safety
    /// AVX-512 F; `src.len() >= 16`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(src: &[Self]) -> core::arch::x86_64::__m512;
}

impl KvElem for f32 {
    fn round_from(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline(always)]
    fn widen_n<const AVX: bool, const N: usize>(src: &[f32]) -> [f32; N] {
        src[..N].try_into().unwrap()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load8(src: &[f32]) -> core::arch::x86_64::__m256 {
        assert!(src.len() >= 8);
        core::arch::x86_64::_mm256_loadu_ps(src.as_ptr())
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(src: &[f32]) -> core::arch::x86_64::__m512 {
        assert!(src.len() >= 16);
        core::arch::x86_64::_mm512_loadu_ps(src.as_ptr())
    }
}

impl KvElem for f16 {
    fn round_from(dst: &mut [f16], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn round(x: f32) -> f16 {
        f16::from_f32(x)
    }

    #[inline(always)]
    fn widen(self) -> f32 {
        super::f16::to_f32(self.to_bits())
    }

    #[inline(always)]
    fn widen_n<const AVX: bool, const N: usize>(src: &[f16]) -> [f32; N] {
        #[cfg(target_arch = "x86_64")]
        if AVX && N.is_multiple_of(8) {
            // Loops, not `from_fn`: a closure would not inherit the target features.
            let mut wide = [0f32; N];
            for c0 in (0..N).step_by(8) {
                // SAFETY: `AVX` says the CPU has AVX and F16C; `src` holds `N` values.
                let eight = unsafe { Self::load8(&src[c0..N]) };
                // SAFETY: `wide` holds 8 floats from `c0`.
                unsafe { core::arch::x86_64::_mm256_storeu_ps(wide[c0..].as_mut_ptr(), eight) };
            }
            return wide;
        }
        #[cfg(target_arch = "aarch64")]
        if N.is_multiple_of(8) {
            use core::arch::aarch64::{vld1q_u16, vst1q_f32};
            let mut wide = [0f32; N];
            for c0 in (0..N).step_by(8) {
                // SAFETY: NEON is baseline; `src` holds `N` values and `wide` `N` floats.
                unsafe {
                    let halves = vld1q_u16(src[c0..N].as_ptr().cast());
                    let [lo, hi] = super::f16::widen8(halves);
                    vst1q_f32(wide[c0..].as_mut_ptr(), lo);
                    vst1q_f32(wide[c0 + 4..].as_mut_ptr(), hi);
                }
            }
            return wide;
        }
        let src = &src[..N];
        std::array::from_fn(|c| src[c].widen())
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    unsafe fn load8(src: &[f16]) -> core::arch::x86_64::__m256 {
        use core::arch::x86_64::*;
        assert!(src.len() >= 8);
        _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().cast()))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(src: &[f16]) -> core::arch::x86_64::__m512 {
        use core::arch::x86_64::*;
        assert!(src.len() >= 16);
        _mm512_cvtph_ps(_mm256_loadu_si256(src.as_ptr().cast()))
    }
}

/// `out[h] += Σ_j p[h][j] · row(j)` for the next `H` heads of `outs` and `probs` at once
/// (each row is read once for all of them), summed over `j` in order from zero (as repeated
/// `y += p x` would), `COLS` columns at a time so that the sums stay in registers: `H · COLS`
/// of them, enough independent sums to hide the additions' latency.
#[inline(always)]
fn weighted_rows<'o, 'p, 'v, T: KvElem, const AVX: bool, const H: usize, const COLS: usize>(
    outs: &mut impl Iterator<Item = &'o mut [f32]>,
    probs: &mut impl Iterator<Item = &'p [f32]>,
    row: impl Fn(usize) -> &'v [T],
) {
    let mut out: [&mut [f32]; H] = std::array::from_fn(|_| outs.next().unwrap());
    let p: [&[f32]; H] = std::array::from_fn(|_| probs.next().unwrap());
    // All of one length, so that the loops index them unchecked.
    let n = p[0].len();
    let p = p.map(|p| &p[..n]);
    let width = out[0].len();
    let whole = width / COLS * COLS;
    for c0 in (0..whole).step_by(COLS) {
        let mut acc: [[f32; COLS]; H] =
            std::array::from_fn(|h| out[h][c0..c0 + COLS].try_into().unwrap());
        for j in 0..n {
            let v: [f32; COLS] = T::widen_n::<AVX, COLS>(&row(j)[c0..]);
            for (acc, p) in acc.iter_mut().zip(&p) {
                let pj = p[j];
                for c in 0..COLS {
                    acc[c] += pj * v[c];
                }
            }
        }
        for (out, acc) in out.iter_mut().zip(&acc) {
            out[c0..c0 + COLS].copy_from_slice(acc);
        }
    }
    if whole < width {
        for j in 0..p[0].len() {
            let v = &row(j)[whole..width];
            for (out, p) in out.iter_mut().zip(&p) {
                for (o, &v) in out[whole..].iter_mut().zip(v) {
                    *o += p[j] * v.widen();
                }
            }
        }
    }
}

/// Asks for `data`'s cache lines (into L2) ahead of their use.
#[inline(always)]
fn prefetch<T>(data: &[T]) {
    // Every line the values touch: a head's row in the cache need not start on a line, and
    // then spans one line more than its size.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        use super::qmatmul::prefetch::{self, Cache};
        prefetch::lines(data.as_ptr().cast(), std::mem::size_of_val(data), Cache::L2);
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = data;
}

/// Row `row`, head `head` of a `[n, width]` matrix of heads of `head_dim`.
#[inline]
fn head_row<T>(data: &[T], row: usize, head: usize, width: usize, head_dim: usize) -> &[T] {
    &data[row * width + head * head_dim..][..head_dim]
}

/// One sequence of a batch for `attention_forward_seqs`: its rows of the batch, the
/// position of its first row, and its cached keys and values (every position up to its
/// last row).
pub struct SeqKv<'a> {
    pub rows: std::ops::Range<usize>,
    pub pos0: usize,
    pub kv: CachedKv<'a>,
}

/// Keys and values of positions `0 .. n_keys` as an inference cache stores them: the keys
/// in blocks (`store_key_blocks`, `key_blocks_len(n_keys, kv_dim)` values), the values as
/// rows `[n_keys, kv_dim]`.
#[derive(Debug, Clone, Copy)]
pub enum CachedKv<'a> {
    F32 {
        key_blocks: &'a [f32],
        values: &'a [f32],
    },
    F16 {
        key_blocks: &'a [f16],
        values: &'a [f16],
    },
}

/// Keys (and values) at a time: a block of them, read from memory once, serves every query
/// head of a group from the L1 cache.
const BLOCK: usize = 64;

/// Values that key blocks holding positions `0 .. n_keys` take (whole blocks; saturating,
/// for a context of any size).
pub fn key_blocks_len(n_keys: usize, kv_dim: usize) -> usize {
    n_keys
        .div_ceil(BLOCK)
        .saturating_mul(BLOCK)
        .saturating_mul(kv_dim)
}

/// Writes keys `[n, kv_dim]` for positions `pos0 ..` into `blocks`, rounded to `T`. Keys
/// are kept transposed in blocks of `BLOCK` positions — block `b` is `[kv_dim][BLOCK]`,
/// value `i` of key `b · BLOCK + c` at `(b · kv_dim + i) · BLOCK + c` — so that a block's
/// scores come a vector of keys at a time, with no horizontal sums and no transposes per
/// query.
pub fn store_key_blocks<T: KvElem>(blocks: &mut [T], kv_dim: usize, pos0: usize, keys: &[f32]) {
    for (j, key) in (pos0..).zip(keys.chunks_exact(kv_dim)) {
        let (b, c) = (j / BLOCK, j % BLOCK);
        let block = &mut blocks[b * kv_dim * BLOCK..][..kv_dim * BLOCK];
        for (i, &x) in key.iter().enumerate() {
            block[i * BLOCK + c] = T::round(x);
        }
    }
}

/// `out = softmax(q kᵀ / sqrt(head_dim) + causal mask) v` for each head; `lse[t, h]` receives
/// the log-sum-exp of the scaled scores, which is all the backward needs to rebuild them.
/// Keys as rows: they are put in blocks first (`attention_forward_seqs` reads a cache's).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    shape: AttentionShape,
    pos0: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let kv_dim = shape.kv_dim();
    let mut key_blocks = vec![0f32; key_blocks_len(k.len() / kv_dim, kv_dim)];
    store_key_blocks(&mut key_blocks, kv_dim, 0, k);
    let seq = |_| SeqKv {
        rows: 0..q.len() / shape.q_dim(),
        pos0,
        kv: CachedKv::F32 {
            key_blocks: &key_blocks,
            values: v,
        },
    };
    attention_forward_seqs(shape, 1, seq, q, out, lse)
}

/// `attention_forward` for the `n_seqs` sequences `seq(0..n_seqs)` of a batch in one
/// parallel pass (`q`, `out` and `lse` hold the batch's rows). A row's bits depend on its own
/// sequence only. Allocates nothing (inference's warm forwards allocate only logits).
pub fn attention_forward_seqs<'a>(
    shape: AttentionShape,
    n_seqs: usize,
    seq: impl Fn(usize) -> SeqKv<'a> + Sync,
    q: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let hd = shape.head_dim;
    let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
    let group = shape.n_head / shape.n_head_kv;
    let n_rows = lse.len() / shape.n_head;
    assert!(out.len() == n_rows * q_dim && lse.len() == n_rows * shape.n_head);
    let (out_ptr, lse_ptr) = (SyncPtr(out.as_mut_ptr()), SyncPtr(lse.as_mut_ptr()));
    // One task per row and key/value head (its query heads are adjacent in the row), so that
    // a single decoded token still spreads over the cores. Head-major: the rows a core takes
    // in turn read the same head's keys and values, which stay in its cache.
    (0..shape.n_head_kv * n_rows).into_par_iter().for_each(|i| {
        let (g, row) = (i / n_rows, i % n_rows);
        let at = row * shape.n_head_kv + g;
        // SAFETY: task (g, row) writes only head group `g` of row `row`, inside the buffers
        // (asserted above).
        let (out, lse) = unsafe {
            (
                out_ptr.slice(at * group * hd, group * hd),
                lse_ptr.slice(at * group, group),
            )
        };
        let seq = (0..n_seqs)
            .map(&seq)
            .find(|seq| seq.rows.contains(&row))
            .expect("every row of the batch belongs to a sequence");
        let pos = seq.pos0 + (row - seq.rows.start);
        let q = &q[row * q_dim + g * group * hd..][..group * hd];
        let visible = shape.first_key(pos)..pos + 1;
        match seq.kv {
            CachedKv::F32 { key_blocks, values } => {
                let task = HeadGroup::new(q, key_blocks, values, g, kv_dim, visible);
                attend_in_chunks(&shape, &task, out, lse)
            }
            CachedKv::F16 { key_blocks, values } => {
                let task = HeadGroup::new(q, key_blocks, values, g, kv_dim, visible);
                attend_in_chunks(&shape, &task, out, lse)
            }
        }
    });
}

/// Keys a task attends to at once. A row that sees more is split into chunks of this many
/// keys, attended in parallel and combined, so that a decoded token's few key/value heads
/// still spread over the cores; the split depends on the number of keys only, so a row's
/// bits do not depend on its batch.
const KEY_CHUNK: usize = 512;

/// `attend` over `task`'s keys, `KEY_CHUNK` at a time: each chunk's softmax and weighted
/// values, then the chunks combined in order by their log-sum-exps.
fn attend_in_chunks<T: KvElem + Sync>(
    shape: &AttentionShape,
    task: &HeadGroup<T>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let visible = &task.visible;
    if visible.len() <= KEY_CHUNK {
        return scratch::with_f32(|buf| attend(shape, task, out, lse, buf));
    }
    let (hd, heads, chunks) = (shape.head_dim, lse.len(), visible.len().div_ceil(KEY_CHUNK));
    scratch::with_f32(|parts| {
        parts.resize(chunks * heads * (hd + 1), 0.0);
        let (part_outs, part_lses) = parts.split_at_mut(chunks * heads * hd);
        part_outs
            .par_chunks_mut(heads * hd)
            .zip(part_lses.par_chunks_mut(heads))
            .enumerate()
            .for_each(|(c, (out, lse))| {
                let start = visible.start + c * KEY_CHUNK;
                let keys = start..(start + KEY_CHUNK).min(visible.end);
                let chunk = HeadGroup {
                    visible: keys,
                    ..*task
                };
                scratch::with_f32(|buf| attend(shape, &chunk, out, lse, buf))
            });
        for (h, (out, lse)) in out.chunks_exact_mut(hd).zip(lse.iter_mut()).enumerate() {
            let part_lse = |c: usize| part_lses[c * heads + h];
            let max = (0..chunks).map(part_lse).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..chunks).map(|c| exp(part_lse(c) - max)).sum();
            *lse = max + sum.ln();
            out.fill(0.0);
            for c in 0..chunks {
                let weight = exp(part_lse(c) - *lse);
                let part = &part_outs[(c * heads + h) * hd..][..hd];
                out.iter_mut().zip(part).for_each(|(o, p)| *o += weight * p);
            }
        }
    })
}

/// One task of `attention_forward_seqs`: a row's query heads that share one key/value head,
/// against that head's visible keys.
struct HeadGroup<'a, T> {
    /// The query heads, one after the other.
    q: &'a [f32],
    /// Every key/value head's keys, in blocks (`store_key_blocks`).
    key_blocks: &'a [T],
    values: &'a [T],
    kv_head: usize,
    kv_dim: usize,
    visible: std::ops::Range<usize>,
}

impl<'a, T> HeadGroup<'a, T> {
    fn new(
        q: &'a [f32],
        key_blocks: &'a [T],
        values: &'a [T],
        kv_head: usize,
        kv_dim: usize,
        visible: std::ops::Range<usize>,
    ) -> Self {
        HeadGroup {
            q,
            key_blocks,
            values,
            kv_head,
            kv_dim,
            visible,
        }
    }

    /// The head's keys of block `b`, transposed: `[head_dim][BLOCK]`.
    fn key_block(&self, b: usize, hd: usize) -> &'a [T] {
        &self.key_blocks[(b * self.kv_dim + self.kv_head * hd) * BLOCK..][..hd * BLOCK]
    }
}

/// `attend_group` compiled for the best instruction set this CPU has (`qmatmul::isa`): the
/// same source and order of operations, so the same bits, only wider registers and fewer
/// instructions.
fn attend<T: KvElem>(
    shape: &AttentionShape,
    task: &HeadGroup<T>,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::qmatmul::{isa, Isa};
        match isa() {
            // SAFETY: `isa` reports the features these are compiled for.
            Isa::Avx512 => return unsafe { attend_avx512::<T>(shape, task, out, lse, scratch) },
            Isa::Avx2 => return unsafe { attend_avx2::<T>(shape, task, out, lse, scratch) },
            Isa::Portable => {}
        }
    }
    attend_group::<T, false, false>(shape, task, out, lse, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: KvElem>(
    shape: &AttentionShape,
    task: &HeadGroup<T>,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    attend_group::<T, true, false>(shape, task, out, lse, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_avx512<T: KvElem>(
    shape: &AttentionShape,
    task: &HeadGroup<T>,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    attend_group::<T, true, true>(shape, task, out, lse, scratch)
}

/// Query heads at a time in the weighted sum: one value row serves all of them while it is
/// in registers.
const HEADS: usize = 4;

/// The task's scores, softmax and weighted values, head `h` into `out[h * head_dim..]` and
/// `lse[h]`. `AVX`: the CPU has AVX2 and F16C (the caller's target features), for the scores
/// and the widening of f16 keys and values; `AVX512`: it has AVX-512 F too, twice the
/// registers and their width for the scores and the weighted sums.
#[inline(always)]
fn attend_group<T: KvElem, const AVX: bool, const AVX512: bool>(
    shape: &AttentionShape,
    task: &HeadGroup<T>,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let hd = shape.head_dim;
    let visible = task.visible.clone();
    let n = visible.len();
    scratch.resize(lse.len() * n, 0.0);
    let scores = &mut scratch[..];
    // The cache's blocks that hold visible keys, the first and the last cut to them.
    for b in visible.start / BLOCK..visible.end.div_ceil(BLOCK) {
        let keys = visible.start.max(b * BLOCK)..visible.end.min((b + 1) * BLOCK);
        let keys_t = task.key_block(b, hd);
        let in_block = keys.start - b * BLOCK..keys.end - b * BLOCK;
        let at = keys.start - visible.start..keys.end - visible.start;
        for (q, scores) in task.q.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
            let scores = &mut scores[at.clone()];
            #[cfg(target_arch = "x86_64")]
            if AVX512 {
                // SAFETY: `AVX512` says the CPU has AVX-512 F.
                unsafe { block_scores_avx512(q, keys_t, in_block.clone(), scores) };
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if AVX {
                // SAFETY: `AVX` says the CPU has AVX and F16C.
                unsafe { block_scores_avx(q, keys_t, in_block.clone(), scores) };
                continue;
            }
            block_scores(q, keys_t, in_block.clone(), scores);
        }
    }
    for (scores, lse) in scores.chunks_exact_mut(n).zip(lse.iter_mut()) {
        *lse = softmax(scores, shape);
    }
    out.fill(0.0);
    let value = |j| {
        head_row(
            task.values,
            visible.start + j,
            task.kv_head,
            task.kv_dim,
            hd,
        )
    };
    for b0 in (0..n).step_by(BLOCK) {
        let block = b0..n.min(b0 + BLOCK);
        // The weighted sums pass over a block's values several times (column blocks, heads),
        // so the next block is asked for at once rather than row by row.
        (block.end..n.min(block.end + BLOCK)).for_each(|j| prefetch(value(j)));
        let value = |j| value(b0 + j);
        let mut outs = out.chunks_exact_mut(hd);
        let mut probs = scores.chunks_exact(n).map(|p| &p[block.clone()]);
        // `H · COLS / lanes` sums in registers, as many as they hold: 8 would hide the
        // additions' latency (2 a cycle, 4 cycles each).
        while outs.len() >= HEADS {
            match AVX512 {
                true => weighted_rows::<T, AVX, HEADS, 32>(&mut outs, &mut probs, value),
                false => weighted_rows::<T, AVX, HEADS, 16>(&mut outs, &mut probs, value),
            }
        }
        // The remaining heads (fewer than `HEADS`) together, their columns wider.
        match (outs.len(), AVX512) {
            (1, _) => weighted_rows::<T, AVX, 1, 64>(&mut outs, &mut probs, value),
            (2, _) => weighted_rows::<T, AVX, 2, 32>(&mut outs, &mut probs, value),
            (3, true) => weighted_rows::<T, AVX, 3, 32>(&mut outs, &mut probs, value),
            (3, false) => weighted_rows::<T, AVX, 3, 16>(&mut outs, &mut probs, value),
            _ => {}
        }
    }
}

/// `scores[k] = q · key keys.start + k` for the keys `keys` of a block stored transposed
/// (`keys_t[d * BLOCK + k]`, widened as they are read): a vector of keys at a time, each
/// one's products summed in order of `d`.
#[inline(always)]
fn block_scores<T: KvElem>(q: &[f32], keys_t: &[T], keys: Range<usize>, scores: &mut [f32]) {
    if keys.len() == BLOCK {
        let mut acc = [0f32; BLOCK];
        for (d, &x) in q.iter().enumerate() {
            let keys = T::widen_n::<false, BLOCK>(&keys_t[d * BLOCK..]);
            for k in 0..BLOCK {
                acc[k] += x * keys[k];
            }
        }
        scores.copy_from_slice(&acc);
    } else {
        scores.fill(0.0);
        for (d, &x) in q.iter().enumerate() {
            for (s, y) in scores.iter_mut().zip(&keys_t[d * BLOCK..][keys.clone()]) {
                *s += x * y.widen();
            }
        }
    }
}

/// `block_scores` with AVX, the sums in registers (the compiler keeps the plain one's array
/// in memory, each step waiting for the last one's store): the whole block, whichever of its
/// keys are asked for, as the lanes past them cost nothing more. The same products and
/// additions, so the same bits.
///
/// # Safety
/// The CPU has AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx,f16c")]
unsafe fn block_scores_avx<T: KvElem>(
    q: &[f32],
    keys_t: &[T],
    keys: Range<usize>,
    scores: &mut [f32],
) {
    use core::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); BLOCK / 8];
    for (d, &x) in q.iter().enumerate() {
        let x = _mm256_set1_ps(x);
        let keys = &keys_t[d * BLOCK..][..BLOCK];
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, T::load8(&keys[8 * k..])));
        }
    }
    let mut all = [0f32; BLOCK];
    for (k, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(all[8 * k..].as_mut_ptr(), *acc);
    }
    scores.copy_from_slice(&all[keys]);
}

/// `block_scores_avx` 16 keys a register.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block_scores_avx512<T: KvElem>(
    q: &[f32],
    keys_t: &[T],
    keys: Range<usize>,
    scores: &mut [f32],
) {
    use core::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); BLOCK / 16];
    for (d, &x) in q.iter().enumerate() {
        let x = _mm512_set1_ps(x);
        let keys = &keys_t[d * BLOCK..][..BLOCK];
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(x, T::load16(&keys[16 * k..])));
        }
    }
    let mut all = [0f32; BLOCK];
    for (k, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(all[16 * k..].as_mut_ptr(), *acc);
    }
    scores.copy_from_slice(&all[keys]);
}

/// `attention_forward` for a whole batch, with GEMMs: per query head, the `[n_tokens, n_keys]`
/// scores in one product, causal softmax by rows, then one product with the values. About
/// twice as fast as the rows one by one for training's sequences, but its bits depend on the
/// batch and it allocates (inside the GEMM), so inference keeps `attention_forward`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_batched(
    shape: AttentionShape,
    pos0: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let hd = shape.head_dim;
    let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
    let (n, n_head) = (q.len() / q_dim, shape.n_head);
    let n_keys = pos0 + n;
    assert!(k.len() == n_keys * kv_dim && v.len() == k.len() && lse.len() == n * n_head);
    let (out_ptr, lse_ptr) = (SyncPtr(out.as_mut_ptr()), SyncPtr(lse.as_mut_ptr()));
    (0..n_head).into_par_iter().for_each(|head| {
        let g = shape.kv_head(head);
        scratch::with_f32(|buf| {
            buf.resize(n * n_keys + n * hd, 0.0);
            let (s, o) = buf.split_at_mut(n * n_keys);
            let (k_g, v_g) = (
                cols(k, g, kv_dim, n_keys, hd),
                cols(v, g, kv_dim, n_keys, hd),
            );
            gemm(
                cols(q, head, q_dim, n, hd),
                k_g.t(),
                MatMut::new(s, n, n_keys),
                false,
                false,
            );
            for (t, row) in s.chunks_exact_mut(n_keys).enumerate() {
                let (first, visible) = (shape.first_key(pos0 + t), pos0 + t + 1);
                let row_lse = softmax(&mut row[first..visible], &shape);
                // SAFETY: column `head` of lse belongs to this task; t < n.
                let lse_t = unsafe { lse_ptr.slice(t * n_head + head, 1) };
                lse_t[0] = row_lse;
                row[..first].fill(0.0);
                row[visible..].fill(0.0);
            }
            gemm(
                MatRef::new(s, n, n_keys),
                v_g,
                MatMut::new(o, n, hd),
                false,
                false,
            );
            for (t, row) in o.chunks_exact(hd).enumerate() {
                // SAFETY: columns of query head `head` of out belong to this task.
                unsafe { out_ptr.slice(t * q_dim + head * hd, hd) }.copy_from_slice(row);
            }
        })
    });
}

/// `s ← softmax(score(s))` in place (raw products in); returns the log-sum-exp of the scores.
/// The maximum and the sum run in eight lanes, so that they vectorize.
#[inline(always)]
fn softmax(s: &mut [f32], shape: &AttentionShape) -> f32 {
    shape.score_all(s);
    let max = lanes_fold(s, f32::NEG_INFINITY, f32::max);
    s.iter_mut().for_each(|x| *x = exp(*x - max));
    let sum = lanes_fold(s, 0.0, |a, b| a + b);
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// `s` folded by `f` in eight interleaved lanes, then the lanes in order.
#[inline(always)]
fn lanes_fold(s: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        for l in 0..8 {
            lanes[l] = f(lanes[l], chunk[l]);
        }
    }
    let lanes = lanes.into_iter().fold(init, &f);
    chunks.remainder().iter().fold(lanes, |a, &b| f(a, b))
}

/// One query row of the backward: raw products `p` become probabilities
/// `exp(score − lse)`, and `ds` (`dO · v` in) becomes `p ⊙ (ds − D) · score′`. The score
/// functions come in as closures so that the row without a soft cap vectorizes.
#[inline(always)]
fn probs_and_score_grads(
    p: &mut [f32],
    ds: &mut [f32],
    row_lse: f32,
    big_d: f32,
    score: impl Fn(f32) -> f32,
    slope: impl Fn(f32) -> f32,
) {
    for (p, ds) in p.iter_mut().zip(ds) {
        let score = score(*p);
        *p = exp(score - row_lse);
        *ds = *p * (*ds - big_d) * slope(score);
    }
}

/// A head's columns of an `[n, width]` matrix.
fn cols(data: &[f32], head: usize, width: usize, n: usize, hd: usize) -> MatRef<'_> {
    MatRef::with_stride(&data[head * hd..], n, hd, width)
}

/// Gradients of `attention_forward` (with `pos0 = 0`: training runs whole sequences).
/// With P = softmax(S), S = score(Q Kᵀ) (causal, windowed), D_t = dO_t · O_t, per query head:
///   dV += Pᵀ dO,   dS = P ⊙ (dO Vᵀ − D) · score′,   dQ = dS K,   dK += dSᵀ Q,
/// each product one GEMM over the head's `[n_tokens, n_tokens]` scores.
/// `dq`, `dk`, `dv` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let hd = shape.head_dim;
    let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
    let n = q.len() / q_dim;
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SyncPtr(dq.as_mut_ptr()),
        SyncPtr(dk.as_mut_ptr()),
        SyncPtr(dv.as_mut_ptr()),
    );
    let group = shape.n_head / shape.n_head_kv;
    // One task per key/value head: it alone writes that head's columns of dk and dv, and the
    // columns of dq of its query heads.
    (0..shape.n_head_kv).into_par_iter().for_each(|g| {
        scratch::with_f32(|buf| {
            buf.resize(2 * n * n + 3 * n * hd, 0.0);
            let (p, rest) = buf.split_at_mut(n * n);
            let (ds, rest) = rest.split_at_mut(n * n);
            let (dq_h, rest) = rest.split_at_mut(n * hd);
            let (dk_g, dv_g) = rest.split_at_mut(n * hd);
            let (k_g, v_g) = (cols(k, g, kv_dim, n, hd), cols(v, g, kv_dim, n, hd));
            for head in g * group..(g + 1) * group {
                let (q_h, d_o) = (cols(q, head, q_dim, n, hd), cols(d_out, head, q_dim, n, hd));
                gemm(q_h, k_g.t(), MatMut::new(p, n, n), false, false);
                gemm(d_o, v_g.t(), MatMut::new(ds, n, n), false, false);
                for t in 0..n {
                    let big_d = dot(
                        head_row(d_out, t, head, q_dim, hd),
                        head_row(out, t, head, q_dim, hd),
                    );
                    let row_lse = lse[t * shape.n_head + head];
                    let (p_t, ds_t) = (&mut p[t * n..(t + 1) * n], &mut ds[t * n..(t + 1) * n]);
                    let first = shape.first_key(t);
                    let (p_seen, ds_seen) = (&mut p_t[first..=t], &mut ds_t[first..=t]);
                    match shape.softcap {
                        Some(_) => probs_and_score_grads(
                            p_seen,
                            ds_seen,
                            row_lse,
                            big_d,
                            |dot| shape.score(dot),
                            |score| shape.score_slope(score),
                        ),
                        None => probs_and_score_grads(
                            p_seen,
                            ds_seen,
                            row_lse,
                            big_d,
                            |dot| shape.scale * dot,
                            |_| shape.scale,
                        ),
                    }
                    for row in [&mut *p_t, &mut *ds_t] {
                        row[..first].fill(0.0);
                        row[t + 1..].fill(0.0);
                    }
                }
                let first = head == g * group;
                let (p, ds) = (MatRef::new(p, n, n), MatRef::new(ds, n, n));
                gemm(p.t(), d_o, MatMut::new(dv_g, n, hd), !first, false);
                gemm(ds.t(), q_h, MatMut::new(dk_g, n, hd), !first, false);
                gemm(ds, k_g, MatMut::new(dq_h, n, hd), false, false);
                for (t, row) in dq_h.chunks_exact(hd).enumerate() {
                    // SAFETY: columns of query head `head` (of this group) of dq belong to
                    // this task.
                    unsafe { dq_ptr.slice(t * q_dim + head * hd, hd) }.copy_from_slice(row);
                }
            }
            for (j, (dk_j, dv_j)) in dk_g.chunks_exact(hd).zip(dv_g.chunks_exact(hd)).enumerate() {
                // SAFETY: columns of kv head `g` of dk and dv belong to this task.
                unsafe { dk_ptr.slice(j * kv_dim + g * hd, hd) }.copy_from_slice(dk_j);
                unsafe { dv_ptr.slice(j * kv_dim + g * hd, hd) }.copy_from_slice(dv_j);
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0) - 1.0)
            .collect()
    }

    const SHAPE: AttentionShape = AttentionShape {
        n_head: 4,
        n_head_kv: 2,
        head_dim: 3,
        scale: 0.577_350_3,
        softcap: None,
        window: None,
    };

    /// Gemma's extras, small enough to bite on these values.
    const CAPPED_WINDOW: AttentionShape = AttentionShape {
        softcap: Some(0.7),
        window: Some(3),
        ..SHAPE
    };

    #[test]
    fn first_position_copies_its_value() {
        let q = values(12, 1);
        let k = values(6, 2);
        let v = values(6, 3);
        let mut out = vec![0f32; 12];
        let mut lse = vec![0f32; 4];
        attention_forward(SHAPE, 0, &q, &k, &v, &mut out, &mut lse);
        // One key: softmax weight 1, every query head returns its kv head's value.
        assert_eq!(&out[0..3], &v[0..3]);
        assert_eq!(&out[3..6], &v[0..3]);
        assert_eq!(&out[6..9], &v[3..6]);
    }

    /// A direct evaluation of the definition, for comparison.
    fn naive(shape: AttentionShape, pos0: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (hd, q_dim, kv_dim) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
        let n = q.len() / q_dim;
        let mut out = vec![0f32; q.len()];
        for t in 0..n {
            for h in 0..shape.n_head {
                let g = shape.kv_head(h);
                let visible = |j: usize| shape.window.is_none_or(|w| pos0 + t - j < w);
                let s: Vec<f32> = (0..=pos0 + t)
                    .map(|j| {
                        let dot = (0..hd)
                            .map(|i| q[t * q_dim + h * hd + i] * k[j * kv_dim + g * hd + i])
                            .sum::<f32>();
                        let s = dot * shape.scale;
                        let s = shape.softcap.map_or(s, |c| c * (s / c).tanh());
                        if visible(j) {
                            s
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
                let z: f32 = e.iter().sum();
                for i in 0..hd {
                    out[t * q_dim + h * hd + i] = e
                        .iter()
                        .enumerate()
                        .map(|(j, p)| p / z * v[j * kv_dim + g * hd + i])
                        .sum();
                }
            }
        }
        out
    }

    /// Wide enough for every path of `attend_group`: a group of `HEADS` query heads and one
    /// more, heads of a full column block and a partial one.
    const WIDE: AttentionShape = AttentionShape {
        n_head: 10,
        n_head_kv: 2,
        head_dim: 20,
        scale: 0.223_606_8,
        softcap: None,
        window: None,
    };

    /// Groups of 3 query heads (the 135M class's), heads a whole number of vectors.
    const GROUPS_OF_3: AttentionShape = AttentionShape {
        n_head: 6,
        n_head_kv: 2,
        head_dim: 16,
        scale: 0.25,
        softcap: None,
        window: None,
    };

    #[test]
    fn both_forwards_match_the_definition_with_a_cache_offset() {
        for shape in [SHAPE, CAPPED_WINDOW, WIDE, GROUPS_OF_3] {
            forwards_match_the_definition(shape, 3);
        }
        // Several blocks of keys, the last one ending inside a group of 8.
        forwards_match_the_definition(WIDE, 150);
        forwards_match_the_definition(GROUPS_OF_3, 150);
        // Rows that see more than one chunk of keys: two whole chunks and a partial one.
        forwards_match_the_definition(GROUPS_OF_3, 2 * KEY_CHUNK + 100);
        let capped = AttentionShape {
            softcap: Some(0.7),
            ..GROUPS_OF_3
        };
        forwards_match_the_definition(capped, 2 * KEY_CHUNK + 100);
    }

    fn forwards_match_the_definition(shape: AttentionShape, pos0: usize) {
        let n = 4;
        let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
        let q = values(n * q_dim, 8);
        let k = values((pos0 + n) * kv_dim, 9);
        let v = values((pos0 + n) * kv_dim, 10);
        let expected = naive(shape, pos0, &q, &k, &v);
        let mut lse_rows = vec![0f32; n * shape.n_head];
        for forward in [attention_forward, attention_forward_batched] {
            let mut out = vec![0f32; n * q_dim];
            let mut lse = vec![0f32; n * shape.n_head];
            forward(shape, pos0, &q, &k, &v, &mut out, &mut lse);
            for (a, b) in out.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            if lse_rows.iter().all(|&l| l == 0.0) {
                lse_rows = lse;
            } else {
                for (a, b) in lse.iter().zip(&lse_rows) {
                    assert!((a - b).abs() < 1e-5, "lse {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn a_token_alone_has_the_same_bits_as_in_a_batch() {
        for shape in [SHAPE, WIDE] {
            a_token_alone_has_the_same_bits_as_in_a_batch_with(shape, 70);
        }
        // Past one chunk of keys.
        a_token_alone_has_the_same_bits_as_in_a_batch_with(GROUPS_OF_3, KEY_CHUNK + 40);
        // Rows whose first key (under a window) lies inside a block of the cache.
        let window = AttentionShape {
            window: Some(100),
            ..GROUPS_OF_3
        };
        a_token_alone_has_the_same_bits_as_in_a_batch_with(window, 230);
    }

    fn a_token_alone_has_the_same_bits_as_in_a_batch_with(shape: AttentionShape, n: usize) {
        let (q_dim, kv_dim, n_head) = (shape.q_dim(), shape.kv_dim(), shape.n_head);
        let q = values(n * q_dim, 11);
        let k = values(n * kv_dim, 12);
        let v = values(n * kv_dim, 13);
        let mut out = vec![0f32; n * q_dim];
        let mut lse = vec![0f32; n * n_head];
        attention_forward(shape, 0, &q, &k, &v, &mut out, &mut lse);
        for t in 0..n {
            let (mut out_t, mut lse_t) = (vec![0f32; q_dim], vec![0f32; n_head]);
            let (k, v) = (&k[..(t + 1) * kv_dim], &v[..(t + 1) * kv_dim]);
            let q_t = &q[t * q_dim..][..q_dim];
            attention_forward(shape, t, q_t, k, v, &mut out_t, &mut lse_t);
            assert_eq!(out_t, out[t * q_dim..][..q_dim], "token {t}");
            assert_eq!(lse_t, lse[t * n_head..][..n_head], "token {t}");
        }
    }

    /// `values` rounded to f16: as f16, and as the f32s they equal.
    fn halves(n: usize, seed: usize) -> (Vec<f16>, Vec<f32>) {
        let h: Vec<f16> = values(n, seed).into_iter().map(f16::from_f32).collect();
        let f = h.iter().map(|x| x.to_f32()).collect();
        (h, f)
    }

    /// Keys `[n, kv_dim]` as a cache of `T` stores them.
    fn blocks<T: KvElem>(keys: &[f32], kv_dim: usize) -> Vec<T> {
        let mut blocks = vec![T::default(); key_blocks_len(keys.len() / kv_dim, kv_dim)];
        store_key_blocks(&mut blocks, kv_dim, 0, keys);
        blocks
    }

    /// Widening is exact and the sums run in the same order, so f16 rows give the bits of
    /// f32 rows of the same values (on whatever instruction set `isa` picks).
    #[test]
    fn f16_rows_give_the_bits_of_f32_rows_of_the_same_values() {
        // SHAPE: heads narrower than a vector; WIDE: remainder heads and columns.
        for shape in [SHAPE, CAPPED_WINDOW, WIDE, GROUPS_OF_3] {
            let (n, pos0) = (4, 150);
            let (q_dim, kv_dim, n_keys) = (shape.q_dim(), shape.kv_dim(), pos0 + 4);
            let q = values(n * q_dim, 17);
            let ((_, k), (v16, v)) = (halves(n_keys * kv_dim, 18), halves(n_keys * kv_dim, 19));
            let run = |kv: CachedKv| {
                let (mut out, mut lse) = (vec![0f32; n * q_dim], vec![0f32; n * shape.n_head]);
                let seq = |_| SeqKv {
                    rows: 0..n,
                    pos0,
                    kv,
                };
                attention_forward_seqs(shape, 1, seq, &q, &mut out, &mut lse);
                (out, lse)
            };
            let exact = run(CachedKv::F32 {
                key_blocks: &blocks(&k, kv_dim),
                values: &v,
            });
            assert_eq!(
                run(CachedKv::F16 {
                    key_blocks: &blocks(&k, kv_dim),
                    values: &v16
                }),
                exact
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        for shape in [SHAPE, WIDE, GROUPS_OF_3] {
            every_instruction_set_gives_the_same_bits_with(shape);
        }
    }

    /// Every kernel, on f32 rows and on f16 rows of the same values, against the portable one
    /// on f32 rows.
    #[cfg(target_arch = "x86_64")]
    fn every_instruction_set_gives_the_same_bits_with(shape: AttentionShape) {
        use crate::ops::qmatmul::{isa, Isa};
        let (group, n, kv_dim) = (shape.n_head / shape.n_head_kv, 150, shape.kv_dim());
        let q = values(group * shape.head_dim, 14);
        let ((_, k), (v16, v)) = (halves(n * kv_dim, 15), halves(n * kv_dim, 16));
        let (k32, k16) = (blocks::<f32>(&k, kv_dim), blocks::<f16>(&k, kv_dim));
        // Whole blocks and cut ones, the first key on a block boundary and inside a block.
        for visible in [0..n, 37..n, 70..100] {
            let kernel =
                |attend, keys, values| run_kernel(attend, &shape, &q, keys, values, &visible);
            let expected = kernel(attend_group::<f32, false, false>, &k32[..], &v[..]);
            let kernels_f32: [(Isa, Kernel<f32>); 3] = [
                (Isa::Portable, attend_group::<f32, false, false>),
                (Isa::Avx2, attend_avx2::<f32>),
                (Isa::Avx512, attend_avx512::<f32>),
            ];
            let kernels_f16: [(Isa, Kernel<f16>); 3] = [
                (Isa::Portable, attend_group::<f16, false, false>),
                (Isa::Avx2, attend_avx2::<f16>),
                (Isa::Avx512, attend_avx512::<f16>),
            ];
            for ((needs, f32_rows), (_, f16_rows)) in kernels_f32.into_iter().zip(kernels_f16) {
                if isa() >= needs {
                    assert_eq!(kernel(f32_rows, &k32, &v), expected, "{needs:?}");
                    let f16_out = run_kernel(f16_rows, &shape, &q, &k16, &v16, &visible);
                    assert_eq!(f16_out, expected, "{needs:?}, f16 rows");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    type Kernel<T> =
        unsafe fn(&AttentionShape, &HeadGroup<T>, &mut [f32], &mut [f32], &mut Vec<f32>);

    /// `attend` on query heads `q` of kv head 1 against keys (in blocks) and values
    /// `visible`.
    #[cfg(target_arch = "x86_64")]
    fn run_kernel<T: KvElem>(
        attend: Kernel<T>,
        shape: &AttentionShape,
        q: &[f32],
        key_blocks: &[T],
        values: &[T],
        visible: &std::ops::Range<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let group = shape.n_head / shape.n_head_kv;
        let (kv_dim, visible) = (shape.kv_dim(), visible.clone());
        let task = HeadGroup::new(q, key_blocks, values, 1, kv_dim, visible);
        let (mut out, mut lse) = (vec![0f32; q.len()], vec![0f32; group]);
        // SAFETY: each kernel runs only where `isa` reports its features.
        unsafe { attend(shape, &task, &mut out, &mut lse, &mut Vec::new()) };
        (out, lse)
    }

    #[test]
    fn sequences_in_one_pass_have_the_bits_of_each_alone() {
        // (rows in the batch, cached positions before them) per sequence.
        let shapes = [(1, 9), (5, 0), (3, 2)];
        let (mut caches, mut q) = (Vec::new(), Vec::new());
        for (i, &(n, pos0)) in shapes.iter().enumerate() {
            let n_keys = pos0 + n;
            let k = values(n_keys * 6, 20 + i);
            caches.push((blocks::<f32>(&k, 6), k, values(n_keys * 6, 30 + i)));
            q.extend(values(n * 12, 40 + i));
        }
        let mut start = 0;
        let seqs: Vec<SeqKv> = shapes
            .iter()
            .zip(&caches)
            .map(|(&(n, pos0), (key_blocks, _, values))| {
                start += n;
                SeqKv {
                    rows: start - n..start,
                    pos0,
                    kv: CachedKv::F32 { key_blocks, values },
                }
            })
            .collect();
        let n_rows = start;
        let (mut out, mut lse) = (vec![0f32; n_rows * 12], vec![0f32; n_rows * 4]);
        let seq = |i: usize| SeqKv {
            rows: seqs[i].rows.clone(),
            ..seqs[i]
        };
        attention_forward_seqs(SHAPE, seqs.len(), seq, &q, &mut out, &mut lse);
        for (seq, (_, k, v)) in seqs.iter().zip(&caches) {
            let (mut out_s, mut lse_s) = (
                vec![0f32; seq.rows.len() * 12],
                vec![0f32; seq.rows.len() * 4],
            );
            let q_s = &q[seq.rows.start * 12..seq.rows.end * 12];
            attention_forward(SHAPE, seq.pos0, q_s, k, v, &mut out_s, &mut lse_s);
            assert_eq!(out_s, out[seq.rows.start * 12..seq.rows.end * 12]);
            assert_eq!(lse_s, lse[seq.rows.start * 4..seq.rows.end * 4]);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for shape in [SHAPE, CAPPED_WINDOW] {
            backward_matches_finite_differences_with(shape);
        }
    }

    fn backward_matches_finite_differences_with(shape: AttentionShape) {
        let n = 5;
        let q = values(n * 12, 4);
        let k = values(n * 6, 5);
        let v = values(n * 6, 6);
        let w = values(n * 12, 7); // loss = Σ w ⊙ out
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0f32; n * 12];
            let mut lse = vec![0f32; n * 4];
            attention_forward(shape, 0, q, k, v, &mut out, &mut lse);
            out.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut out = vec![0f32; n * 12];
        let mut lse = vec![0f32; n * 4];
        attention_forward(shape, 0, &q, &k, &v, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * 12], vec![0f32; n * 6], vec![0f32; n * 6]);
        attention_backward(shape, &q, &k, &v, &out, &lse, &w, &mut dq, &mut dk, &mut dv);
        let check = |analytic: &[f32], which: usize| {
            for i in 0..analytic.len() {
                let mut inputs = [q.clone(), k.clone(), v.clone()];
                inputs[which][i] += 1e-3;
                let plus = loss(&inputs[0], &inputs[1], &inputs[2]);
                inputs[which][i] -= 2e-3;
                let minus = loss(&inputs[0], &inputs[1], &inputs[2]);
                let numeric = (plus - minus) / 2e-3;
                assert!(
                    (analytic[i] as f64 - numeric).abs() < 2e-3,
                    "input {which} element {i}: {} vs {numeric}",
                    analytic[i]
                );
            }
        };
        check(&dq, 0);
        check(&dk, 1);
        check(&dv, 2);
    }
}
