//! Per-thread scratch buffers, so that a warm forward allocates nothing.
//!
//! A buffer is taken from its thread's free list for the duration of a use and put back
//! after. A rayon worker waiting inside a parallel region may start another job that needs
//! scratch too (a projection joined beside this one, another forward's work); that job takes
//! the next buffer of the list, allocating it the first time only, instead of aliasing the
//! buffer in use.

use std::cell::RefCell;
use std::thread::LocalKey;

thread_local! {
    static F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static WORDS: RefCell<Vec<Vec<u64>>> = const { RefCell::new(Vec::new()) };
}

/// Takes a buffer from this thread's `free` list for the duration of `f`, then returns it.
fn lend<T: 'static, R>(
    free: &'static LocalKey<RefCell<Vec<Vec<T>>>>,
    f: impl FnOnce(&mut Vec<T>) -> R,
) -> R {
    let mut buf = free.with(|list| list.borrow_mut().pop().unwrap_or_default());
    let result = f(&mut buf);
    free.with(|list| list.borrow_mut().push(buf));
    result
}

/// Runs `f` with this thread's f32 scratch (any length; contents unspecified).
pub fn with_f32<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    lend(&F32, f)
}

/// Runs `f` with `len` values of `T` in this thread's scratch, zeroed first.
///
/// `T` must be plain data valid for any bit pattern, of alignment at most 8 (ggml blocks,
/// floats): that is what the `Pod` bound promises.
pub fn with_zeroed<T: Pod, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    lend(&WORDS, |words| {
        let n_words = (len * std::mem::size_of::<T>()).div_ceil(8);
        words.clear();
        words.resize(n_words, 0);
        // SAFETY: the buffer holds at least `len` T-sized, 8-aligned, zeroed slots; `Pod` types
        // are valid for the all-zero pattern and need alignment <= 8.
        let typed = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<T>(), len) };
        f(typed)
    })
}

/// Runs `f` with `len` values of `T` in this thread's scratch, contents unspecified (`Pod`
/// values are valid for any bits): for buffers that are written whole before being read.
/// 64-byte aligned, so that rows of whole lines start on one (a line-sized load of a row that
/// straddles two reads both).
pub fn with_pod<T: Pod, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    with_aligned_bytes(len * std::mem::size_of::<T>(), |bytes| {
        // SAFETY: `bytes` holds `len` T-sized, 64-aligned, initialised slots; `Pod` types are
        // valid for any bit pattern and need alignment <= 8.
        let typed = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), len) };
        f(typed)
    })
}

/// Runs `f` with `len` bytes of this thread's word scratch (the list `with_zeroed` uses),
/// 64-byte aligned, contents unspecified.
pub fn with_aligned_bytes<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    lend(&WORDS, |words| {
        let n_words = (len + 64).div_ceil(8);
        if words.len() < n_words {
            words.resize(n_words, 0);
        }
        // SAFETY: `words` holds at least `len + 64` initialised bytes, so `len` of them start at
        // a 64-byte aligned address within the first 64; u8 has no alignment or validity
        // requirements, and `words` outlives the slice.
        let bytes = unsafe {
            let ptr = words.as_mut_ptr().cast::<u8>();
            std::slice::from_raw_parts_mut(ptr.add(ptr.align_offset(64)), len)
        };
        f(bytes)
    })
}

/// Plain data valid for any bit pattern (including all zeros), alignment at most 8.
///
/// # Safety
/// Implementors must be `#[repr(C)]` (or primitive) types of integers and floats only.
pub unsafe trait Pod {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: candle's blocks are `#[repr(C)]` structs of integers, f16/f32 and byte
        // arrays; the floats are plain.
        unsafe impl Pod for $t {}
        const _: () = assert!(std::mem::align_of::<$t>() <= 8);
    )* };
}

use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, BlockQ8_1};
pod!(
    u16,
    u32,
    f32,
    half::f16,
    half::bf16,
    BlockQ8_0,
    BlockQ8_1,
    BlockQ8K
);
