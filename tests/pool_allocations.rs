//! A warm memory pool allocates nothing per forward but the logits it returns.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lugh::{Inference, Model};

/// Counts every allocation of the process (all threads).
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// (K-quant embeddings are left out: candle's K-quant dequantizer, which the embedding lookup
/// uses, allocates a small index for each row.)
#[test]
fn a_warm_pool_allocates_only_the_logits() {
    let files = [
        "tiny-llama/base-f32.gguf",
        "tiny-llama/base-f16.gguf",
        "tiny-llama/base-q4_0.gguf",
        "tiny-qwen2/base-q8_0.gguf",
    ];
    for file in files {
        let model = Arc::new(Model::open(fixture(file), true).unwrap());
        let inf = Inference::new(model, Some(64), Some(2)).unwrap();
        let mut pool = inf.create_memory_pool();
        let tokens: Vec<u32> = (1..20).collect();
        for _ in 0..5 {
            inf.forward_pool(&mut pool, &tokens, &[]).unwrap();
        }
        // Now and then rayon grows a job queue, or a worker waiting in one product steals a
        // job that needs scratch it is still holding: count many calls, so that those rare
        // allocations stay apart from one made on every call (which doubles the count).
        const CALLS: usize = 50;
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        for _ in 0..CALLS {
            let logits = inf.forward_pool(&mut pool, &tokens, &[]).unwrap();
            assert_eq!(logits.len(), inf.config().n_vocab);
        }
        let allocated = ALLOCATIONS.load(Ordering::SeqCst) - before;
        eprintln!("{file}: {allocated} allocations in {CALLS} warm forwards");
        assert!(
            allocated <= CALLS + CALLS / 2,
            "{file}: {allocated} allocations in {CALLS} warm forwards (one each, the logits, expected)"
        );
    }
}
