//! `lugh serve`: an OpenAI-compatible HTTP server over one base model and named adapters.
//! Requests for different adapters (or none) decode together in one batch; requests join and
//! leave the batch between steps (see `scheduler`).

mod adapters;
mod api;
mod metrics;
mod routes;
mod scheduler;
mod text;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::infer::Inference;
use crate::lora::LoraAdapter;

pub use scheduler::Limits;

/// How long `stop` lets open connections end after the requests in progress have been
/// ended: a client that keeps a connection open, idle or half-way through sending a
/// request, is cut off after this rather than holding the shutdown forever.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How the server listens and what it allows.
#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    /// 0: any free port (`Server::addr` tells which).
    pub port: u16,
    pub limits: Limits,
    /// Every request must carry `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// The most tokens one request may generate (default: the context).
    pub max_tokens: Option<usize>,
    /// Replaces the GGUF's chat template.
    pub chat_template: Option<String>,
    /// The base model's name in `/v1/models` and `model` (default: the file's stem).
    pub model_name: Option<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            host: "127.0.0.1".into(),
            port: 8080,
            limits: Limits {
                max_batch: 16,
                max_prefill_tokens: 2048,
            },
            api_key: None,
            max_body_bytes: 4 << 20,
            max_tokens: None,
            chat_template: None,
            model_name: None,
        }
    }
}

/// A named adapter to serve, and where it came from (shown as its `root`).
pub struct NamedAdapter {
    pub name: String,
    pub source: String,
    pub adapter: Arc<LoraAdapter>,
}

/// A running server; `stop` (or dropping it) shuts it down.
pub struct Server {
    addr: SocketAddr,
    /// Tells the scheduler to end every request (set by `stop`).
    stopping: Arc<AtomicBool>,
    /// Set to true by `stop`.
    shutdown: watch::Sender<bool>,
    http: Option<JoinHandle<()>>,
    scheduler: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds, then serves on threads of its own: an HTTP runtime and the scheduler, which
    /// runs the forwards on `inference`'s threads.
    pub fn start(
        inference: Arc<Inference>,
        adapters: Vec<NamedAdapter>,
        options: Options,
    ) -> Result<Server> {
        let Limits {
            max_batch,
            max_prefill_tokens,
        } = options.limits;
        if max_batch == 0 || max_prefill_tokens == 0 {
            return Err(Error::invalid(
                "max_batch",
                "batch limits must be at least 1",
            ));
        }
        let tokenizer = Arc::new(crate::Tokenizer::from_gguf(inference.model().file())?);
        if let Some(template) = &options.chat_template {
            tokenizer.end_of_turn(Some(template))?;
        }
        let base = options.model_name.clone().unwrap_or_else(|| {
            let path = inference.model().path();
            path.file_stem().map_or_else(
                || path.display().to_string(),
                |s| s.to_string_lossy().into(),
            )
        });
        let registry = adapters::Registry::new(base);
        for a in adapters {
            a.adapter.check_fits(inference.config())?;
            registry
                .add(&a.name, a.source, a.adapter)
                .map_err(|e| Error::invalid("adapter", e.message))?;
        }
        let address = format!("{}:{}", options.host, options.port);
        let listener = TcpListener::bind(&address)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| Error::io(&address, e))?;
        let addr = listener.local_addr().map_err(|e| Error::io(&address, e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lugh-http")
            .enable_all()
            .build()
            .map_err(|e| Error::io(&address, e))?;

        let metrics = Arc::new(metrics::Metrics::default());
        let (jobs, queue) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let scheduler = {
            let (inference, metrics) = (Arc::clone(&inference), Arc::clone(&metrics));
            let stopping = Arc::clone(&stopping);
            let limits = options.limits;
            std::thread::Builder::new()
                .name("lugh-scheduler".into())
                .spawn(move || scheduler::run(inference, queue, limits, metrics, stopping))
                .map_err(|e| Error::io(&address, e))?
        };
        let max_tokens = options.max_tokens.unwrap_or(inference.n_ctx());
        let state = Arc::new(routes::AppState {
            inference,
            tokenizer,
            chat_template: options.chat_template,
            adapters: registry,
            jobs,
            metrics,
            max_tokens,
            api_key: options.api_key,
            max_body_bytes: options.max_body_bytes,
            created: adapters::now(),
            next_id: AtomicU64::new(1),
        });
        let app = routes::router(state);
        let (shutdown, stopped) = watch::channel(false);
        let http = std::thread::Builder::new()
            .name("lugh-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    // Either ends the wait: `stop` was called, or the server was dropped.
                    let signalled = |mut stopped: watch::Receiver<bool>| async move {
                        let _ = stopped.wait_for(|&stop| stop).await;
                    };
                    let serve = axum::serve(listener, app)
                        .with_graceful_shutdown(signalled(stopped.clone()));
                    let deadline = async {
                        signalled(stopped).await;
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                    };
                    // Past the deadline, dropping the runtime closes the connections left.
                    tokio::select! {
                        _ = serve => {}
                        () = deadline => {}
                    }
                });
            })
            .map_err(|e| Error::io(&address, e))?;
        Ok(Server {
            addr,
            stopping,
            shutdown,
            http: Some(http),
            scheduler: Some(scheduler),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it still serves (false once stopped, or if its HTTP thread ended).
    pub fn is_running(&self) -> bool {
        self.http.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Stops accepting connections, ends the requests in progress (their clients get an
    /// error), closes the connections still open `SHUTDOWN_GRACE` later, and waits for both
    /// threads.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.shutdown.send_replace(true);
        for handle in [self.http.take(), self.scheduler.take()]
            .into_iter()
            .flatten()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
