//! Software prefetches on x86-64 and aarch64: hints, which never fault whatever the address.

#[cfg(target_arch = "aarch64")]
use std::arch::asm;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};

/// The cache a prefetch fills.
#[derive(Clone, Copy)]
pub(crate) enum Cache {
    L1,
    L2,
}

#[cfg(target_arch = "x86_64")]
impl Cache {
    /// Where the row kernels' weight streams are prefetched: L2 on Intel cores, L1 elsewhere,
    /// the faster of the two on each vendor's cores measured (benches/README, sixteenth and
    /// twenty-sixth sessions).
    pub(crate) fn row_streams() -> Cache {
        use std::sync::OnceLock;
        static INTEL: OnceLock<bool> = OnceLock::new();
        // CPUID leaf 0 names the vendor in EBX, EDX, ECX: "Genu", "ineI", "ntel".
        let intel = *INTEL.get_or_init(|| {
            let id = std::arch::x86_64::__cpuid(0);
            (id.ebx, id.edx, id.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
        });
        match intel {
            true => Cache::L2,
            false => Cache::L1,
        }
    }
}

/// Asks for the line holding `p` into `cache`.
#[inline(always)]
fn line(p: *const u8, cache: Cache) {
    // SAFETY: a prefetch reads nothing and never faults.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match cache {
            Cache::L1 => _mm_prefetch::<_MM_HINT_T0>(p.cast()),
            Cache::L2 => _mm_prefetch::<_MM_HINT_T1>(p.cast()),
        }
    }
    // SAFETY: as above.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        match cache {
            Cache::L1 => {
                asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags))
            }
            Cache::L2 => {
                asm!("prfm pldl2keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags))
            }
        }
    }
}

/// Prefetches `len` bytes from `p` into `cache`, one line per 64 bytes from `p`: where `p`
/// does not start a line, the line the range ends in is left to a stream's next call (the
/// row kernels' streams: counting lines from the one holding `p` cost the 4-bit decode rows
/// about 10 %).
#[inline(always)]
pub(crate) fn bytes(p: *const u8, len: usize, cache: Cache) {
    for off in (0..len).step_by(64) {
        line(p.wrapping_add(off), cache);
    }
}

/// Prefetches every line of `p..p + len` into `cache`: a one-off range.
#[inline(always)]
pub(crate) fn lines(p: *const u8, len: usize, cache: Cache) {
    let skew = p as usize % 64;
    bytes(p.wrapping_sub(skew), skew + len, cache)
}
