//! kache's HTTP side: listeners, the request pipeline, forwarding, admin
//! endpoints.
//!
//! ```text
//!  clients ──► main listener (server.rs) ──► Pipeline (pipeline.rs)
//!                                              identify ─ guard.rs (local) / authn.rs (shared: certificates,
//!                                                         TokenReview, impersonation)
//!                                              authorize ─ authz.rs (shared: local RBAC + SubjectAccessReview)
//!                                              classify ─ kache_cache::RequestInfo
//!                                              route    ─ kache_cache::Discovery, kache_cache::Cache (memory)
//!                                              admit    ─ admit.rs (per-client seats, fair queues)
//!                                                         coalesce.rs (identical reads share a call)
//!                                                         forward.rs ──► Upstream (upstream.rs) ──► API server
//!                                              respond  ─ error.rs / status.rs
//!  operators ─► admin listener ──► admin.rs (/livez /readyz /metrics ◄── metrics.rs,
//!                                            / ─ status_page.rs, /debug/cache, /debug/clients)
//! ```

pub mod admin;
pub mod admit;
pub mod authn;
pub mod authz;
pub mod body;
pub mod coalesce;
pub mod error;
pub mod forward;
pub mod guard;
pub mod kubeconfig;
pub mod ledger;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod socket;
pub mod status;
pub mod status_page;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kache_cache::discovery::{Discovery, DiscoveryMetrics};
use kache_cache::rbac::Rbac;
use kache_cache::resources::{Cache, CacheMetrics};
use kache_config::{AuthorizationMode, Config, Mode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admit::{AdmitMetrics, Limiter};
use crate::authn::{Authenticator, AuthnMetrics};
use crate::authz::{Authorizer, AuthzMetrics};
use crate::coalesce::{CoalesceMetrics, Coalescer};
use crate::guard::LocalGuard;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, SharedAuth};
use crate::server::ListenerSettings;
use crate::upstream::{Exchange, Upstream};

/// Why kache could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("upstream: {0}")]
    Upstream(#[from] upstream::SetupError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running kache: both listeners bound and serving.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    limiter: Arc<Limiter>,
    cache: Cache,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Applies what can change without a restart: the concurrency limits.
    /// Queued and running requests keep their seats.
    pub fn reload(&self, config: &Config) {
        self.limiter.reconfigure(&config.limits);
        tracing::info!("limits reloaded");
    }

    /// Stops accepting, ends watches, lets other in-flight requests finish
    /// (bounded), saves the stores' snapshots (when configured), and returns.
    pub async fn shutdown(self) {
        // The cache first: its watchers get their last bookmark (at the
        // saved version) and end by themselves, before connections drain.
        self.cache.shutdown().await;
        self.shutdown.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Binds both listeners and starts serving.
///
/// # Errors
/// Unusable kubeconfig or certificates, addresses that cannot be bound.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let upstream = Upstream::from_config(&config.upstream).await?;
    let client_ca = match &config.mode {
        Mode::Shared(shared) => shared.client_ca_file.as_deref(),
        Mode::Local => None,
    };
    let tls = match &config.listener.tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            tls, client_ca,
        )?)),
        None => None,
    };
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(config.listener.addr).await?;
    let admin_listener = bind(config.admin.addr).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listener.addr,
        source,
    })?;
    let admin_addr = admin_listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.admin.addr,
        source,
    })?;

    let mut metrics = Metrics::new();
    let discovery_metrics = DiscoveryMetrics::register(metrics.registry_mut());
    let cache_metrics = CacheMetrics::register(metrics.registry_mut());
    let coalesce_metrics = CoalesceMetrics::register(metrics.registry_mut());
    let admit_metrics = AdmitMetrics::register(metrics.registry_mut());
    let authn_metrics = AuthnMetrics::register(metrics.registry_mut());
    let authz_metrics = AuthzMetrics::register(metrics.registry_mut());
    let ledger = Arc::new(ledger::Ledger::default());
    metrics
        .registry_mut()
        .register_collector(Box::new(ledger::LedgerCollector(ledger.clone())));
    let limiter = Arc::new(Limiter::new(&config.limits, admit_metrics));
    let metrics = Arc::new(metrics);
    let api_client: Arc<dyn kache_cache::upstream::ApiClient> = Arc::new(upstream.clone());
    let discovery = Discovery::new(api_client.clone(), config.discovery.clone(), discovery_metrics);
    let cache = Cache::new(
        api_client.clone(),
        discovery.clone(),
        config.cache.clone(),
        cache_metrics,
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    // Shared mode's RBAC evaluator (rbac authorization), watched from the start.
    let rbac = match &config.mode {
        Mode::Shared(shared) if shared.authorization == AuthorizationMode::Rbac => {
            let rbac = Rbac::new(api_client.clone());
            tasks.push(tokio::spawn(until_shutdown(
                rbac.clone().run(),
                shutdown_rx.clone(),
            )));
            Some(rbac)
        }
        _ => None,
    };
    let shared = match &config.mode {
        Mode::Local => None,
        Mode::Shared(shared) => Some(SharedAuth {
            authenticator: Authenticator::new(shared, upstream.clone(), authn_metrics),
            authorizer: Authorizer::new(shared, rbac.clone(), upstream.clone(), authz_metrics),
            bare_upstream: upstream.without_credentials()?,
        }),
    };
    tracing::info!(
        listen = %addr,
        admin = %admin_addr,
        upstream = %upstream.url(),
        tls = tls.is_some(),
        mode = config.mode.as_str(),
        "kache serving"
    );

    let pipeline = Arc::new(Pipeline {
        guard: LocalGuard::new(&config.listener),
        shared,
        client_key: config.limits.client_key.clone(),
        discovery: discovery.clone(),
        cache: cache.clone(),
        limiter: limiter.clone(),
        coalescer: Coalescer::new(coalesce_metrics),
        upstream: upstream.clone(),
        metrics: metrics.clone(),
        ledger: ledger.clone(),
        max_request_body_bytes: config.listener.max_request_body_bytes,
        serve_stale: config.cache.serve_stale,
        shutdown: shutdown_rx.clone(),
    });
    let main = server::serve(
        listener,
        ListenerSettings {
            name: "main",
            tls,
            header_read_timeout: config.listener.header_read_timeout,
            max_header_bytes: config.listener.max_header_bytes,
            max_connections: config.listener.max_connections,
        },
        move |peer, request| pipeline.clone().handle(peer, request),
        shutdown_rx.clone(),
    );
    let admin_state = {
        let mut state = admin::AdminState::new(metrics.clone(), cache.clone(), ledger, api_client.clone());
        state.rbac = rbac;
        state.preload = config.cache.preload.clone();
        state.upstream = Arc::new(admin::UpstreamInfo::new(
            api_client.clone(),
            upstream.url().to_string(),
        ));
        state.mode = config.mode.as_str();
        Arc::new(state)
    };
    let upstream_info = admin_state.upstream.clone();
    let sampler = tokio::spawn(until_shutdown(
        admin_state.clone().run_sampler(),
        shutdown_rx.clone(),
    ));
    let admin = server::serve(
        admin_listener,
        ListenerSettings {
            name: "admin",
            tls: None,
            header_read_timeout: config.listener.header_read_timeout,
            max_header_bytes: kache_config::DEFAULT_MAX_HEADER_BYTES,
            // Probes and scrapes: few, but never starved by the main listener.
            max_connections: 64,
        },
        move |_peer, request| {
            let response = admin::handle(&admin_state, &request);
            async move { response }
        },
        shutdown_rx.clone(),
    );
    tasks.extend([
        tokio::spawn(main),
        tokio::spawn(admin),
        sampler,
        tokio::spawn(probe_until_ready(
            upstream.clone(),
            metrics.clone(),
            upstream_info,
            shutdown_rx.clone(),
        )),
        tokio::spawn(until_shutdown(discovery.run(), shutdown_rx.clone())),
        // Snapshots are stamped with the cluster's identity, so a state
        // directory moved to another cluster is never served; the warm start
        // (in run_preload) needs it first.
        tokio::spawn(until_shutdown(
            {
                let cache = cache.clone();
                let api_client = api_client.clone();
                let url = upstream.url().to_string();
                let snapshots = config.cache.snapshot_dir.is_some();
                async move {
                    if snapshots {
                        match kache_cache::resources::cluster_identity(api_client.as_ref()).await {
                            Ok(uid) => cache.enable_snapshots(url, uid),
                            Err(error) => {
                                tracing::warn!(%error, "cannot learn the cluster's identity: no snapshots this run")
                            }
                        }
                    }
                    tokio::join!(cache.clone().run_preload(), cache.run_snapshots());
                }
            },
            shutdown_rx.clone(),
        )),
        tokio::spawn(until_shutdown(cache.clone().run_consistency_checks(), shutdown_rx.clone())),
        tokio::spawn(until_shutdown(cache.clone().run_janitor(), shutdown_rx)),
    ]);
    Ok(Running {
        addr,
        admin_addr,
        metrics,
        limiter,
        cache,
        shutdown,
        tasks,
    })
}

/// Runs a background loop until shutdown.
async fn until_shutdown(task: impl std::future::Future<Output = ()>, mut shutdown: watch::Receiver<bool>) {
    tokio::select! {
        _ = task => {}
        _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {}
    }
}

/// Asks the API server for `/version` until it answers, so `/readyz` turns
/// ready even before the first client request; the status page shows the
/// version it answers.
async fn probe_until_ready(
    upstream: Upstream,
    metrics: Arc<Metrics>,
    info: Arc<admin::UpstreamInfo>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(200);
    while !metrics.is_ready() {
        let request = http::Request::get("/version")
            .header(http::header::ACCEPT, "application/json")
            .body(body::empty())
            .expect("invariant: a static request is valid");
        match upstream.send(request, Exchange::Short).await {
            Ok(response) => {
                metrics.mark_ready();
                if response.status() == http::StatusCode::OK {
                    use http_body_util::BodyExt;
                    let body =
                        tokio::time::timeout(Duration::from_secs(10), response.into_body().collect()).await;
                    if let Ok(Ok(body)) = body {
                        info.learn_version(&body.to_bytes());
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "API server not reachable yet"),
        }
        if metrics.is_ready() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
