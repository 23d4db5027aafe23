//! The bf16 product on Intel's tile unit (AMX-BF16): `tdpbf16ps` multiplies a 16 × 16-pair
//! tile of the left operand by a 16-pair × 16-column tile of the panel into 16 × 16 f32 sums,
//! 8192 products an instruction where `vdpbf16ps` does 32.
//!
//! The panel's layout (pair-major, a word a column) is the one the unit reads, so a panel
//! tile is a load of 16 of its rows 256 bytes apart. Tiles hold 16 rows of 64 bytes here:
//! `tmm0`–`tmm3` the sums of 16 rows × 64 columns, `tmm4` the left operand, `tmm5` and `tmm6`
//! the panel's tiles in turn. The last rows and pairs, when fewer than 16, are copied into
//! zeroed buffers first, so that one configuration serves every call.

use std::arch::asm;
use std::sync::OnceLock;

use super::COLS;
use crate::ops::scratch;

/// Rows of a tile, and pairs a row holds (64 bytes).
const TILE: usize = 16;

/// Whether the tile unit multiplies bf16 here: the CPU has AMX-BF16, the OS lets this
/// process use it, and `LUGH_NO_AMX` is unset (it keeps `vdpbf16ps`).
pub(super) fn available() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        std::env::var_os("LUGH_NO_AMX").is_none() && cpu_has_amx_bf16() && os_permits_tiles()
    })
}

fn cpu_has_amx_bf16() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Linux hands out the tiles' 8 KiB of register state only to processes that ask.
#[cfg(target_os = "linux")]
fn os_permits_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request for a permission; it touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn os_permits_tiles() -> bool {
    false
}

/// `ldtilecfg`'s operand: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = {
    let mut bytes_per_row = [0; 16];
    let mut rows = [0; 16];
    let mut t = 0;
    while t < 8 {
        bytes_per_row[t] = (4 * TILE) as u16;
        rows[t] = TILE as u8;
        t += 1;
    }
    Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row,
        rows,
    }
};

/// `tdpbf16ps tmm{sum}, tmm4, tmm{5 + sum % 2}` after loading that panel tile from `b`
/// (rows `b_bytes` apart).
macro_rules! panel_product {
    ($sum:literal, $panel:literal, $b:expr, $b_bytes:expr) => {
        asm!(
            concat!("tileloadd tmm", $panel, ", [{b} + {stride} * 1]"),
            concat!("tdpbf16ps tmm", $sum, ", tmm4, tmm", $panel),
            b = in(reg) $b,
            stride = in(reg) $b_bytes,
            options(nostack, readonly),
        )
    };
}

/// One step of 16 pairs: the left tile from `a` (rows `a_bytes` apart) times the `tiles`
/// panel tiles at `b` (16 columns apart, rows `COLS` words apart), into the sums.
///
/// # Safety
/// The tiles are configured; `a` holds 16 rows of 16 words and `b` 16 rows of
/// `16 * tiles` words.
#[inline(always)]
unsafe fn step(a: *const u32, a_bytes: usize, b: *const u32, tiles: usize) {
    asm!(
        "tileloadd tmm4, [{a} + {stride} * 1]",
        a = in(reg) a,
        stride = in(reg) a_bytes,
        options(nostack, readonly),
    );
    let b_bytes = 4 * COLS;
    panel_product!("0", "5", b, b_bytes);
    if tiles > 1 {
        panel_product!("1", "6", b.add(TILE), b_bytes);
    }
    if tiles > 2 {
        panel_product!("2", "5", b.add(2 * TILE), b_bytes);
    }
    if tiles > 3 {
        panel_product!("3", "6", b.add(3 * TILE), b_bytes);
    }
}

/// `c[t, ..cols] (+)= Σ_p a[t, p] · panel[p, ..cols]`, as `super::multiply` states it.
///
/// # Safety
/// `available()`; the rows of `a` (`m`, `pairs` words each, `a_stride` apart), the panel's
/// `pairs * COLS` words and the rows of `c` (`m`, `cols ≤ COLS` values each, `c_stride`
/// apart) are in bounds.
pub(super) unsafe fn multiply(
    (a, a_stride): (*const u32, usize),
    m: usize,
    (words, pairs, cols): (*const u32, usize, usize),
    (c, c_stride): (*mut f32, usize),
    accumulate: bool,
) {
    let tiles = cols.div_ceil(TILE);
    let (full, tail) = (pairs / TILE * TILE, pairs % TILE);
    // The panel's last pairs, zero below them.
    let mut panel_tail = Aligned([0u32; TILE * COLS]);
    std::ptr::copy_nonoverlapping(
        words.add(full * COLS),
        panel_tail.0.as_mut_ptr(),
        tail * COLS,
    );
    let mut sums = Aligned([0f32; TILE * COLS]);
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    for t0 in (0..m).step_by(TILE) {
        let rows = (m - t0).min(TILE);
        let a = a.add(t0 * a_stride);
        let run = |a: *const u32, a_stride: usize| {
            // SAFETY (for the closure's body): `a` holds 16 rows of `pairs` words, `a_stride`
            // apart, and the panel `pairs` rows; the tiles are configured.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for p0 in (0..full).step_by(TILE) {
                    step(a.add(p0), 4 * a_stride, words.add(p0 * COLS), tiles);
                }
                if tail > 0 {
                    let mut a_tail = Aligned([0u32; TILE * TILE]);
                    for r in 0..TILE {
                        let src = a.add(r * a_stride + full);
                        let dst = a_tail.0.as_mut_ptr().add(r * TILE);
                        std::ptr::copy_nonoverlapping(src, dst, tail);
                    }
                    step(a_tail.0.as_ptr(), 4 * TILE, panel_tail.0.as_ptr(), tiles);
                }
            }
        };
        match rows == TILE {
            true => run(a, a_stride),
            // The last rows, zero below them.
            false => scratch::with_zeroed::<u32, _>(TILE * pairs, |padded| {
                for r in 0..rows {
                    let src = std::slice::from_raw_parts(a.add(r * a_stride), pairs);
                    padded[r * pairs..(r + 1) * pairs].copy_from_slice(src);
                }
                run(padded.as_ptr(), pairs)
            }),
        }
        let out = sums.0.as_mut_ptr();
        asm!(
            "tilestored [{out} + {stride} * 1], tmm0",
            "tilestored [{out1} + {stride} * 1], tmm1",
            "tilestored [{out2} + {stride} * 1], tmm2",
            "tilestored [{out3} + {stride} * 1], tmm3",
            out = in(reg) out,
            out1 = in(reg) out.add(TILE),
            out2 = in(reg) out.add(2 * TILE),
            out3 = in(reg) out.add(3 * TILE),
            stride = in(reg) 4 * COLS,
            options(nostack),
        );
        for (r, sums) in sums.0.chunks_exact(COLS).take(rows).enumerate() {
            let c = std::slice::from_raw_parts_mut(c.add((t0 + r) * c_stride), cols);
            match accumulate {
                true => c.iter_mut().zip(sums).for_each(|(c, s)| *c += s),
                false => c.copy_from_slice(&sums[..cols]),
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// 64-byte alignment: tile loads and stores of a row then touch one cache line.
#[repr(C, align(64))]
struct Aligned<T>(T);
