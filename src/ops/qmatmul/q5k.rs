//! Q5_K × Q8_K: Q4_K's kernels with the fifth bits (see `q4k`).

use super::act::{Groups, Rows, QK_K};
use super::driver::Format;
use super::q4k::{extra, rows4, tile, unpack, U_BYTES_PER_BLOCK};

pub(crate) struct Q5K;

impl Format for Q5K {
    const BLOCK: usize = QK_K;
    const BLOCK_BYTES: usize = 176;
    const Q8K: bool = true;
    const N_EXTRA: usize = 4;

    fn extra(sums: &[i16], p: usize) -> i32 {
        extra(sums, p)
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES_PER_BLOCK
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4::<true>(w, nb, act, t)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        unpack::<true>(w, nb, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        tile::<T>(w, nb, act, g)
    }
}
