//! One matrix product alone: lugh's kernel against ggml's on the same tensor of a GGUF file,
//! the same activations and the same number of threads, alternated in one process. Where a
//! whole-model run says a type is slow, this says which product and by how much.
//!
//! ```text
//! GGML_LIB_DIR=<folder of libggml-base.so and libggml-cpu.so> \
//!     cargo bench --bench kernels -- MODEL.gguf [TENSOR ...]
//! ```
//!
//! llama-cpp-python ships those libraries in `llama_cpp/lib` (see benches/README.md). The
//! tensors default to layer 0's `attn_q`, `ffn_up` and `ffn_down`. `LUGH_BENCH_THREADS`
//! (default 1) and `LUGH_BENCH_TOKENS` (default `1,128`: a decode row product and a prefill
//! tile product) set the rest. ggml's time includes building its one-node graph (a few µs)
//! and, past one thread, starting its threads at every call: compare decode products on one
//! thread.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::Path;
use std::time::Instant;

use libloading::os::unix::{Library, Symbol, RTLD_GLOBAL, RTLD_NOW};
use lugh::gguf::{GgufFile, TensorInfo};
use lugh::ops::Weight;

/// Timed repetitions per side, alternated; each at least `MIN_SECONDS` of calls.
const REPS: usize = 7;
const MIN_SECONDS: f64 = 0.02;

/// A pause before each repetition: the other side's idle threads spin on after its calls
/// (ggml's OpenMP workers, rayon's), and would take a core from the first calls of this one.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

#[repr(C)]
struct InitParams {
    mem_size: usize,
    mem_buffer: *mut c_void,
    no_alloc: bool,
}

#[repr(C)]
struct GgufParams {
    no_alloc: bool,
    ctx: *mut *mut c_void,
}

/// The few functions of ggml's C API a product needs (ggml.h, gguf.h, ggml-cpu.h).
struct Ggml {
    _libs: [Library; 2],
    init: Symbol<unsafe extern "C" fn(InitParams) -> *mut c_void>,
    free: Symbol<unsafe extern "C" fn(*mut c_void)>,
    gguf_init: Symbol<unsafe extern "C" fn(*const c_char, GgufParams) -> *mut c_void>,
    get_tensor: Symbol<unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void>,
    new_tensor_2d: Symbol<unsafe extern "C" fn(*mut c_void, c_int, i64, i64) -> *mut c_void>,
    get_data: Symbol<unsafe extern "C" fn(*const c_void) -> *mut c_void>,
    mul_mat: Symbol<unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void) -> *mut c_void>,
    new_graph: Symbol<unsafe extern "C" fn(*mut c_void) -> *mut c_void>,
    build_forward: Symbol<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
    compute: Symbol<unsafe extern "C" fn(*mut c_void, *mut c_void, c_int) -> c_int>,
    tensor_overhead: Symbol<unsafe extern "C" fn() -> usize>,
    graph_overhead: Symbol<unsafe extern "C" fn() -> usize>,
}

impl Ggml {
    fn load(dir: &Path) -> Result<Ggml, libloading::Error> {
        // SAFETY: ggml's libraries run no code at load that this process could disturb, and
        // each symbol is declared with its C signature.
        unsafe {
            let base = Library::open(Some(dir.join("libggml-base.so")), RTLD_NOW | RTLD_GLOBAL)?;
            let cpu = Library::open(Some(dir.join("libggml-cpu.so")), RTLD_NOW | RTLD_GLOBAL)?;
            let cpu_init: Symbol<unsafe extern "C" fn()> = cpu.get(b"ggml_cpu_init")?;
            cpu_init();
            Ok(Ggml {
                init: base.get(b"ggml_init")?,
                free: base.get(b"ggml_free")?,
                gguf_init: base.get(b"gguf_init_from_file")?,
                get_tensor: base.get(b"ggml_get_tensor")?,
                new_tensor_2d: base.get(b"ggml_new_tensor_2d")?,
                get_data: base.get(b"ggml_get_data")?,
                mul_mat: base.get(b"ggml_mul_mat")?,
                new_graph: base.get(b"ggml_new_graph")?,
                build_forward: base.get(b"ggml_build_forward_expand")?,
                compute: cpu.get(b"ggml_graph_compute_with_ctx")?,
                tensor_overhead: base.get(b"ggml_tensor_overhead")?,
                graph_overhead: base.get(b"ggml_graph_overhead")?,
                _libs: [base, cpu],
            })
        }
    }
}

/// A GGUF file as ggml loads it: its tensors' data in a ggml context.
struct GgmlFile<'a> {
    ggml: &'a Ggml,
    ctx: *mut c_void,
}

impl<'a> GgmlFile<'a> {
    fn open(ggml: &'a Ggml, path: &Path) -> GgmlFile<'a> {
        let name = CString::new(path.to_str().expect("a UTF-8 path")).unwrap();
        let mut ctx = std::ptr::null_mut();
        let params = GgufParams {
            no_alloc: false,
            ctx: &mut ctx,
        };
        // SAFETY: `name` is a C string; ggml fills `ctx` with the tensors' context.
        let gguf = unsafe { (ggml.gguf_init)(name.as_ptr(), params) };
        assert!(
            !gguf.is_null() && !ctx.is_null(),
            "ggml could not load {path:?}"
        );
        GgmlFile { ggml, ctx }
    }

    /// The tensor `name` in ggml's context.
    fn tensor(&self, name: &str) -> *mut c_void {
        let name = CString::new(name).unwrap();
        // SAFETY: `name` is a C string and `ctx` ggml's context.
        let w = unsafe { (self.ggml.get_tensor)(self.ctx, name.as_ptr()) };
        assert!(!w.is_null(), "ggml has no tensor {name:?}");
        w
    }

    /// `y = x Wᵀ` by ggml for `m` tokens `x` of its tensor `w` (`n` rows of `k`): a context of
    /// its own for the product's graph, result and work buffer, in `arena`.
    fn matmul(
        &self,
        w: *mut c_void,
        n: usize,
        k: usize,
        x: &[f32],
        arena: &mut [u8],
        threads: usize,
    ) -> Vec<f32> {
        let g = self.ggml;
        let m = x.len() / k;
        // SAFETY: `w` and the other pointers come from ggml; `arena` outlives the context
        // (freed before returning) and is as large as `arena_bytes` says the product needs.
        unsafe {
            let ctx = (g.init)(InitParams {
                mem_size: arena.len(),
                mem_buffer: arena.as_mut_ptr().cast(),
                no_alloc: false,
            });
            let xt = (g.new_tensor_2d)(ctx, 0, k as i64, m as i64);
            std::ptr::copy_nonoverlapping(x.as_ptr(), (g.get_data)(xt).cast(), x.len());
            let y = (g.mul_mat)(ctx, w, xt);
            let graph = (g.new_graph)(ctx);
            (g.build_forward)(graph, y);
            assert_eq!((g.compute)(ctx, graph, threads as c_int), 0);
            let out = std::slice::from_raw_parts((g.get_data)(y).cast::<f32>(), m * n).to_vec();
            (g.free)(ctx);
            out
        }
    }

    /// Bytes of the context `matmul` builds: tensors, graph, result, activations and the
    /// work buffer (the activations rounded to the weights' dot type, at most 4 bytes each,
    /// and scratch per thread: a few MiB are plenty).
    fn arena_bytes(&self, n: usize, k: usize, m: usize, threads: usize) -> usize {
        // SAFETY: plain queries.
        let overhead = unsafe { 4 * (self.ggml.tensor_overhead)() + (self.ggml.graph_overhead)() };
        overhead + 4 * m * (2 * k + n) + (threads + 4) * (1 << 20)
    }
}

/// Seconds per call of `f`, best and median of the alternated repetitions.
struct Timing {
    runs: Vec<f64>,
}

impl Timing {
    fn best(&self) -> f64 {
        self.runs.iter().cloned().fold(f64::INFINITY, f64::min)
    }

    fn median(&self) -> f64 {
        let mut runs = self.runs.clone();
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    }
}

/// Calls per timed repetition so that one lasts about `MIN_SECONDS`.
fn calls(mut f: impl FnMut()) -> usize {
    let t = Instant::now();
    f();
    (MIN_SECONDS / t.elapsed().as_secs_f64().max(1e-7)).ceil() as usize
}

fn time(calls: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..calls {
        f();
    }
    t.elapsed().as_secs_f64() / calls as f64
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(model) = args.first() else {
        eprintln!("usage: GGML_LIB_DIR=DIR cargo bench --bench kernels -- MODEL.gguf [TENSOR ...]");
        std::process::exit(2);
    };
    let Some(lib_dir) = std::env::var_os("GGML_LIB_DIR") else {
        eprintln!(
            "GGML_LIB_DIR: the folder of libggml-base.so and libggml-cpu.so (benches/README.md)"
        );
        std::process::exit(2);
    };
    let threads: usize =
        std::env::var("LUGH_BENCH_THREADS").map_or(1, |t| t.parse().expect("LUGH_BENCH_THREADS"));
    let tokens: Vec<usize> = std::env::var("LUGH_BENCH_TOKENS")
        .unwrap_or_else(|_| "1,128".into())
        .split(',')
        .map(|t| t.trim().parse().expect("LUGH_BENCH_TOKENS"))
        .collect();
    let names: Vec<String> = match args.len() {
        1 => ["attn_q", "ffn_up", "ffn_down"]
            .map(|t| format!("blk.0.{t}.weight"))
            .to_vec(),
        _ => args[1..].to_vec(),
    };

    let ggml = Ggml::load(Path::new(&lib_dir)).expect("ggml's libraries");
    let file = GgufFile::open(model, true).expect("the model");
    let ggml_file = GgmlFile::open(&ggml, Path::new(model));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();

    println!("{model}, {threads} thread(s); µs per product, best of {REPS} alternated (median)\n");
    println!(
        "| tensor | type | rows × k | tokens | lugh µs | ggml µs | lugh/ggml speed | max |d|/max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for name in &names {
        let info: &TensorInfo = file
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        let (n, k) = (info.shape[0], info.shape[1]);
        let w = Weight::new(name, info.dtype, n, k, file.tensor_data(info)).expect("the weight");
        let ggml_w = ggml_file.tensor(name);
        for &m in &tokens {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 % 1999) as f32 / 1999.0 - 0.5) * 2.0)
                .collect();
            let mut y = vec![0f32; m * n];
            let mut arena = vec![0u8; ggml_file.arena_bytes(n, k, m, threads)];
            // lugh's calls run inside its pool, as an `Inference` makes them: entering the pool
            // from outside costs a thread's wake-up per call.
            let mut lugh = |calls: Option<usize>| {
                pool.install(|| match calls {
                    Some(calls) => time(calls, || w.matmul(&x, &mut y)),
                    None => self::calls(|| w.matmul(&x, &mut y)) as f64,
                })
            };
            let mut ggml = || ggml_file.matmul(ggml_w, n, k, &x, &mut arena, threads);
            let (lugh_calls, ggml_calls) = (lugh(None) as usize, calls(|| drop(ggml())));
            let (mut lugh_t, mut ggml_t) = (Timing { runs: vec![] }, Timing { runs: vec![] });
            for _ in 0..REPS {
                std::thread::sleep(SETTLE);
                lugh_t.runs.push(lugh(Some(lugh_calls)));
                std::thread::sleep(SETTLE);
                ggml_t.runs.push(time(ggml_calls, || drop(ggml())));
            }
            let reference = ggml();
            pool.install(|| w.matmul(&x, &mut y));
            let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
            let diff = y
                .iter()
                .zip(&reference)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            println!(
                "| {name} | {} | {n} × {k} | {m} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.2} | {:.1e} |",
                info.dtype.name(),
                lugh_t.best() * 1e6,
                lugh_t.median() * 1e6,
                ggml_t.best() * 1e6,
                ggml_t.median() * 1e6,
                ggml_t.best() / lugh_t.best(),
                diff / scale.max(f32::MIN_POSITIVE),
            );
        }
    }
}
