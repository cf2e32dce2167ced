//! The connection to the API server: TLS, credentials and base URL from a
//! kubeconfig (through the `kube` crate), HTTP/2 when the server offers it.
//!
//! ```text
//!   Request<Body> ─► BaseUri ─► Auth (token, token file, exec plugin) ─► ExtraHeaders ─► hyper client ─► API server
//! ```
//!
//! Two connection pools: one that negotiates HTTP/2 (all ordinary requests
//! multiplexed on few connections) and one HTTP/1.1-only for upgrades
//! (exec, attach, port-forward), since HTTP/2 has no `Upgrade`.

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kache_cache::upstream::{BoxFuture, ByteStream, FetchError};
use kache_config::UpstreamConfig;
use kube::client::ConfigExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use crate::body::{Body, BoxError};
use crate::error::ProxyError;

type HttpService = BoxCloneSyncService<Request<Body>, Response<Incoming>, BoxError>;

/// The API server, ready to take requests.
#[derive(Clone)]
pub struct Upstream {
    service: HttpService,
    url: http::Uri,
    timeout: Duration,
    /// Kept to derive the same connection without credentials.
    kube_config: std::sync::Arc<kube::Config>,
    settings: UpstreamConfig,
}

/// Why an upstream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("reading kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("no usable kubeconfig or in-cluster configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("upstream TLS and credentials: {0}")]
    Client(#[from] kube::Error),
    #[error("the kubeconfig's proxy-url ({0}) is not supported; reach the API server directly")]
    ProxyUrl(String),
}

/// How a request is sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Response headers expected within the configured timeout.
    Short,
    /// Watches, logs, proxying, upgrades (SPDY or WebSocket): the response
    /// may take as long as it likes.
    LongRunning,
}

impl Upstream {
    /// Reads the kubeconfig (or in-cluster configuration) and builds the client.
    ///
    /// # Errors
    /// Unreadable kubeconfig, unknown context, bad certificates, unsupported proxy.
    pub async fn from_config(config: &UpstreamConfig) -> Result<Upstream, SetupError> {
        let options = KubeConfigOptions {
            context: config.context.clone(),
            ..KubeConfigOptions::default()
        };
        let kube_config = match (&config.kubeconfig, &config.context) {
            (Some(path), _) => {
                kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?
            }
            (None, Some(_)) => kube::Config::from_kubeconfig(&options).await?,
            (None, None) => kube::Config::infer().await?,
        };
        Upstream::from_kube_config(kube_config, config)
    }

    /// Builds the client from an already-resolved `kube::Config`.
    ///
    /// # Errors
    /// Bad certificates or credentials, unsupported proxy.
    pub fn from_kube_config(
        kube_config: kube::Config,
        config: &UpstreamConfig,
    ) -> Result<Upstream, SetupError> {
        if let Some(proxy) = &kube_config.proxy_url {
            return Err(SetupError::ProxyUrl(proxy.to_string()));
        }
        let service = build_service(&kube_config, config)?;
        Ok(Upstream {
            service,
            url: kube_config.cluster_url.clone(),
            timeout: config.timeout,
            kube_config: std::sync::Arc::new(kube_config),
            settings: config.clone(),
        })
    }

    /// The same API server, TLS trust and settings, but no credentials of
    /// kache's own: no client certificate, no token. Shared mode's
    /// passthrough sends clients' own tokens through it.
    ///
    /// # Errors
    /// See [`Upstream::from_kube_config`].
    pub fn without_credentials(&self) -> Result<Upstream, SetupError> {
        let mut kube_config = (*self.kube_config).clone();
        kube_config.auth_info = kube::config::AuthInfo::default();
        Upstream::from_kube_config(kube_config, &self.settings)
    }

    /// POSTs a JSON object with kache's identity and decodes the JSON answer
    /// (TokenReview, SubjectAccessReview).
    ///
    /// # Errors
    /// The API server could not be asked, or answered with an error status.
    pub async fn post_json<T, R>(&self, path: &str, body: &T) -> Result<R, ProxyError>
    where
        T: serde::Serialize,
        R: serde::de::DeserializeOwned,
    {
        let bytes =
            serde_json::to_vec(body).map_err(|e| ProxyError::Review(format!("encoding {path}: {e}")))?;
        let request = Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, USER_AGENT)
            .body(crate::body::full(bytes))
            .map_err(|e| ProxyError::Review(format!("{path}: {e}")))?;
        let response = self.send(request, Exchange::Short).await?;
        let status = response.status();
        let bytes = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(self.timeout))?
            .map_err(|e| ProxyError::UpstreamFailed(Box::new(e)))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ProxyError::Review(format!("{path}: {status}: {message}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| ProxyError::Review(format!("decoding {path}: {e}")))
    }

    /// The API server's URL, for logs.
    pub fn url(&self) -> &http::Uri {
        &self.url
    }

    /// Sends a request and returns the response head as soon as it arrives;
    /// the body streams afterwards.
    ///
    /// # Errors
    /// Unreachable server (nothing was sent), credentials that cannot be
    /// obtained, a timeout waiting for response headers of a short request, or
    /// a connection that broke during the exchange.
    pub async fn send(
        &self,
        mut request: Request<Body>,
        exchange: Exchange,
    ) -> Result<Response<Incoming>, ProxyError> {
        // Compression costs CPU on both ends and saves nothing on the hops kache sits on.
        request.headers_mut().insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
        // A bodiless GET or HEAD can be sent again if a pooled connection
        // turns out to have been closed by the upstream (a restart, an idle
        // timeout) just as it was used.
        let replay = (matches!(*request.method(), http::Method::GET | http::Method::HEAD)
            && http_body::Body::is_end_stream(request.body()))
        .then(|| {
            let mut copy = Request::new(());
            *copy.method_mut() = request.method().clone();
            *copy.uri_mut() = request.uri().clone();
            *copy.version_mut() = request.version();
            *copy.headers_mut() = request.headers().clone();
            copy
        });
        match self.send_once(request, exchange).await {
            Err(ProxyError::UpstreamFailed(error)) if replay.is_some() => {
                tracing::debug!(%error, "upstream connection failed under a read; sending it again");
                let request = replay
                    .expect("invariant: checked above")
                    .map(|()| crate::body::empty());
                self.send_once(request, exchange).await
            }
            result => result,
        }
    }

    async fn send_once(
        &self,
        request: Request<Body>,
        exchange: Exchange,
    ) -> Result<Response<Incoming>, ProxyError> {
        let call = send_boxed(self.service.clone(), request);
        let result = match exchange {
            Exchange::Short => tokio::time::timeout(self.timeout, call)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(self.timeout))?,
            Exchange::LongRunning => call.await,
        };
        result.map_err(classify_error)
    }
}

/// What kache's own requests (its caches' LISTs and WATCHes, discovery,
/// reviews) say they are, in the API server's audit log and its
/// `apiserver_request_total{client}`; a client's forwarded request keeps
/// its own.
pub const USER_AGENT: &str = concat!("kache/", env!("CARGO_PKG_VERSION"));

/// One of kache's own requests, named [`USER_AGENT`] unless it says otherwise.
fn own(mut request: Request<()>) -> Request<Body> {
    request
        .headers_mut()
        .entry(http::header::USER_AGENT)
        .or_insert(http::HeaderValue::from_static(USER_AGENT));
    request.map(|()| crate::body::empty())
}

/// The caches' view of the upstream: whole responses for discovery, streams for watches.
impl kache_cache::upstream::ApiClient for Upstream {
    fn fetch(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
        Box::pin(async move {
            let response = self
                .send(own(request), Exchange::Short)
                .await
                .map_err(|e| FetchError(e.to_string()))?;
            let (parts, mut body) = response.into_parts();
            let read = async {
                let mut chunks = Vec::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| FetchError(format!("reading the response: {e}")))?;
                    if let Ok(data) = frame.into_data() {
                        chunks.push(data);
                    }
                }
                Ok::<_, FetchError>(match chunks.len() {
                    0 => Bytes::new(),
                    1 => chunks.pop().expect("invariant: one chunk"),
                    _ => Bytes::from(chunks.concat()),
                })
            };
            let bytes = tokio::time::timeout(self.timeout, read)
                .await
                .map_err(|_| FetchError(format!("response body not complete within {:?}", self.timeout)))??;
            Ok(Response::from_parts(parts, bytes))
        })
    }

    fn fetch_each<'a>(
        &'a self,
        request: Request<()>,
        consume: &'a mut (dyn FnMut(Bytes) -> Result<(), FetchError> + Send),
    ) -> BoxFuture<'a, Result<Response<()>, FetchError>> {
        Box::pin(async move {
            // The head within the usual timeout; then the body for as long as
            // it keeps coming (the API server ends a LIST at its own timeout).
            let response = tokio::time::timeout(self.timeout, self.send(own(request), Exchange::LongRunning))
                .await
                .map_err(|_| FetchError(format!("no response within {:?}", self.timeout)))?
                .map_err(|e| FetchError(e.to_string()))?;
            let (parts, mut body) = response.into_parts();
            loop {
                let frame = tokio::time::timeout(self.timeout, body.frame())
                    .await
                    .map_err(|_| FetchError(format!("the response stalled for {:?}", self.timeout)))?;
                let Some(frame) = frame else { break };
                let frame = frame.map_err(|e| FetchError(format!("reading the response: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    consume(data)?;
                }
            }
            Ok(Response::from_parts(parts, ()))
        })
    }

    fn stream(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
        Box::pin(async move {
            let response = self
                .send(own(request), Exchange::LongRunning)
                .await
                .map_err(|e| FetchError(e.to_string()))?;
            Ok(response.map(|body| {
                Box::pin(
                    body.into_data_stream()
                        .map_err(|e| FetchError(format!("reading the stream: {e}"))),
                ) as ByteStream
            }))
        })
    }
}

/// Drives the service to readiness and calls it, as one boxed `Send` future
/// (spelling the future out keeps higher-ranked lifetime inference happy).
fn send_boxed(
    mut service: HttpService,
    request: Request<Body>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Incoming>, BoxError>> + Send>> {
    Box::pin(async move {
        std::future::poll_fn(|cx| tower::Service::poll_ready(&mut service, cx)).await?;
        tower::Service::call(&mut service, request).await
    })
}

/// Sorts a client error into what the client is told: nothing reached the
/// API server (503, retry), credentials failed (503), or the exchange broke (502).
fn classify_error(error: BoxError) -> ProxyError {
    // The client's own body failed: its fault, not the API server's.
    match crate::body::client_body_error(error.as_ref()) {
        Some(crate::body::ClientBodyError::TooLarge(limit)) => return ProxyError::TooLarge(*limit),
        Some(crate::body::ClientBodyError::Broken(cause)) => {
            return ProxyError::BadRequest(format!("the request body could not be read: {cause}"))
        }
        None => {}
    }
    if let Some(hyper_error) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
        if hyper_error.is_connect() {
            return ProxyError::UpstreamUnreachable(error);
        }
        return ProxyError::UpstreamFailed(error);
    }
    // Anything else comes from the auth layer (token file, exec plugin).
    ProxyError::UpstreamCredentials(error)
}

/// The client of the API server: HTTP/1.1, one pooled connection per request
/// in flight, never HTTP/2.
///
/// An API server bounds the streams of an HTTP/2 connection (250 on v1.20,
/// 100 on current releases), and hyper's client, once a connection is full,
/// waits for a stream to end instead of opening another connection: the
/// watches and log streams kache forwards for all its clients would hold up
/// every request behind them (`tests/tests/forwarding.rs`: the 249th open
/// watch got no answer). Over HTTP/1.1 each request in flight has a
/// connection of its own, as it would from the clients themselves, and a
/// large answer costs less than in HTTP/2 frames (a consistent LIST of
/// 10,000 pods, 35 each in turns: 1.06× the direct rate through kache over
/// HTTP/1.1, 0.96× over HTTP/2, and a fifth less of kache's CPU). Upgrades
/// (exec, attach, port-forward) need HTTP/1.1 anyway.
fn build_service(kube_config: &kube::Config, config: &UpstreamConfig) -> Result<HttpService, SetupError> {
    let tls = kube_config.rustls_client_config()?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    // A connection whose peer vanished without a word (a partition, a
    // node gone) is found dead within a minute: 30 s idle, then three
    // probes 10 s apart. A watch, kache's own or a client's, would
    // otherwise wait on it for the kernel's default of eleven minutes and
    // more.
    http.set_keepalive(Some(Duration::from_secs(30)));
    http.set_keepalive_interval(Some(Duration::from_secs(10)));
    http.set_keepalive_retries(Some(3));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match &kube_config.tls_server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                SetupError::Client(kube::Error::Service(
                    format!("invalid tls-server-name: {e}").into(),
                ))
            })?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let connector = builder.enable_http1().wrap_connector(http);
    let client: Client<_, Body> = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        // hyper grows a connection's read buffer with large answers up to
        // 400 KB and keeps it as long as the connection (pooled, or holding
        // a watch): the memory budget's test saw 0.4 MB per connection that
        // had carried a list. Capped at four TLS records a read, a consistent
        // LIST of 10,000 pods ran at 1.58 req/s against 1.63 uncapped (1.61
        // direct; A/B in turns).
        .http1_max_buf_size(64 * 1024)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(kube_config.base_uri_layer())
        .option_layer(kube_config.auth_layer()?)
        .layer(kube_config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(client);
    Ok(BoxCloneSyncService::new(service))
}
