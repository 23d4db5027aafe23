//! Running a forward with the pool's other threads kept awake.
//!
//! A decoded token is hundreds of short parallel steps (a few per layer). Between two of
//! them rayon's idle threads go to sleep, and waking one costs more than most steps: a
//! system call, a context switch, and on a virtual machine an interrupt to another virtual
//! CPU. While a forward runs, the other threads poll for its work instead, as llama.cpp's
//! threads spin between the nodes of a graph.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::{ThreadPool, Yield};

/// `pool.install(f)`, every other thread of `pool` polling for work until `f` returns (or
/// unwinds). Allocates nothing (warm forwards allocate only their logits).
pub(crate) fn install_awake<R: Send>(pool: &ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| {
        let done = AtomicBool::new(false);
        let caller = rayon::current_thread_index();
        let (mut f, mut out) = (Some(f), None);
        let mut run = || {
            let _stop = Stop(&done);
            out = f.take().map(|f| f());
        };
        with_pollers(pool.current_num_threads() - 1, &done, caller, &mut run);
        out.expect("`run` ran")
    })
}

/// Queues `k` pollers (`rayon::join`'s second halves, which the idle threads steal first),
/// then runs `f`.
fn with_pollers(k: usize, done: &AtomicBool, caller: Option<usize>, f: &mut (dyn FnMut() + Send)) {
    match k {
        0 => f(),
        k => {
            let poll = || {
                // The caller takes a poller back only when nobody stole it: polling there
                // would never let `f` go on. A poller that steals another one leaves it to
                // end at once, so that the next idle thread steals the one after.
                if rayon::current_thread_index() != caller && !POLLING.replace(true) {
                    poll_until(done);
                    POLLING.set(false);
                }
            };
            rayon::join(|| with_pollers(k - 1, done, caller, f), poll);
        }
    }
}

thread_local! {
    /// Whether this thread runs a poller already.
    static POLLING: Cell<bool> = const { Cell::new(false) };
}

/// Sets the flag when dropped, so that the pollers stop even if `f` panics.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs the pool's pending jobs as they come, until `done`.
fn poll_until(done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    fn pool(n: usize) -> ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn parallel_work_inside_runs_on_every_thread_and_returns() {
        for n in [1, 2, 3] {
            let pool = pool(n);
            let seen: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
            let sum = install_awake(&pool, || {
                (0..200)
                    .map(|_| {
                        (0..64u64)
                            .into_par_iter()
                            .map(|i| {
                                let index = rayon::current_thread_index().unwrap();
                                seen[index].store(true, Ordering::Relaxed);
                                std::thread::sleep(std::time::Duration::from_micros(20));
                                i
                            })
                            .sum::<u64>()
                    })
                    .sum::<u64>()
            });
            assert_eq!(sum, 200 * 63 * 64 / 2);
            assert!(
                seen.iter().all(|s| s.load(Ordering::Relaxed)),
                "{n} threads"
            );
        }
    }

    #[test]
    fn a_panic_inside_reaches_the_caller_and_the_pool_goes_on() {
        let pool = pool(2);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            install_awake(&pool, || panic!("inside"))
        }));
        assert!(caught.is_err());
        assert_eq!(install_awake(&pool, || 7), 7);
    }
}
