//! kache's benchmarks live in `benches/` (criterion micro-benchmarks) and
//! `e2e/` (the comparison with the API server). This library holds what the
//! end-to-end load generators (`e2e/loadgen.rs`, `e2e/watch.rs`) share: the
//! target they send to, a few bytes of protobuf reading, and a process's CPU.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use http::{header, Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
pub type Http = Client<Connector, Full<Bytes>>;

/// The User-Agent of `kache-e2e`'s requests ([`Target::request`]).
pub const LOADGEN_AGENT: &str = "kache-e2e/0.1";

/// Where to send requests.
#[derive(Args, Clone)]
pub struct Target {
    /// Base URL: `https://127.0.0.1:PORT` (API server) or `http://127.0.0.1:PORT`
    /// (kache, or the nginx that serves kache's answers in `run.sh`; with `--no-auth`).
    #[arg(long)]
    pub url: String,
    /// CA certificate (PEM) for an https URL.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Bearer token (from the environment only).
    #[arg(skip = std::env::var("BENCH_TOKEN").ok())]
    pub token: Option<String>,
    /// Send no `Authorization` (kache in local mode drops it anyway).
    #[arg(long)]
    pub no_auth: bool,
}

impl Target {
    /// Only loopback URLs are accepted.
    ///
    /// # Errors
    /// An unparsable or non-loopback URL.
    pub fn check(&self) -> Result<()> {
        let uri: http::Uri = self.url.parse().context("--url")?;
        match uri.host() {
            Some("127.0.0.1" | "localhost" | "[::1]" | "::1") => Ok(()),
            other => bail!("refusing a non-loopback target {other:?}"),
        }
    }

    /// A connector clients of this target can share (one TLS
    /// configuration, so later handshakes resume sessions).
    ///
    /// # Errors
    /// See [`Target::check`]; an unreadable CA file.
    pub fn connector(&self) -> Result<Connector> {
        self.connector_for(false)
    }

    /// A connector for HTTP/2 clients ([`Target::http2_client_on`]): `h2`
    /// by ALPN over TLS, prior knowledge over cleartext; HTTP/1.1 otherwise.
    ///
    /// # Errors
    /// See [`Target::connector`].
    pub fn http2_connector(&self) -> Result<Connector> {
        self.connector_for(true)
    }

    fn connector_for(&self, http2: bool) -> Result<Connector> {
        self.check()?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.ca {
            for cert in
                CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
            {
                roots.add(cert?)?;
            }
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        Ok(if http2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        })
    }

    /// A client on `connector` with at most one idle connection: one per
    /// worker or watcher, so each keeps its own (HTTP/1.1, like many clients).
    pub fn client_on(connector: &Connector) -> Http {
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector.clone())
    }

    /// An HTTP/2 client on `connector` (see [`Target::http2_connector`]):
    /// its requests are streams of one connection, as client-go multiplexes
    /// its requests to a host.
    pub fn http2_client_on(connector: &Connector) -> Http {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector.clone())
    }

    /// [`Target::client_on`] a connector of its own.
    ///
    /// # Errors
    /// See [`Target::connector`].
    pub fn client(&self) -> Result<Http> {
        Ok(Target::client_on(&self.connector()?))
    }

    /// A request of `kache-e2e` ([`LOADGEN_AGENT`]), its body JSON.
    ///
    /// # Errors
    /// A path that makes no URI.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        accept: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>> {
        self.request_as(
            method,
            path,
            accept,
            body.map(|body| ("application/json", body)),
            LOADGEN_AGENT,
        )
    }

    /// A request saying `User-Agent: agent`, with a body of the given
    /// content type; the bearer token unless `no_auth`; no compression.
    ///
    /// # Errors
    /// A path that makes no URI.
    pub fn request_as(
        &self,
        method: Method,
        path: &str,
        accept: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        agent: &str,
    ) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.url.trim_end_matches('/'), path))
            .header(header::USER_AGENT, agent)
            .header(header::ACCEPT_ENCODING, "identity");
        if let Some(accept) = accept {
            builder = builder.header(header::ACCEPT, accept);
        }
        if let (Some(token), false) = (&self.token, self.no_auth) {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some((content_type, body)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                Bytes::from(body)
            }
            None => Bytes::new(),
        };
        Ok(builder.body(Full::new(body))?)
    }
}

/// Reads a protobuf varint off the front of `buf`.
pub fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Calls `f(field, bytes)` for each length-delimited field of a message;
/// skips varints and fixed-size fields. `None` if the message is malformed.
pub fn fields<'a>(mut buf: &'a [u8], mut f: impl FnMut(u64, &'a [u8])) -> Option<()> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        match key & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = buf.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let (value, rest) = (buf.get(..len)?, buf.get(len..)?);
                f(key >> 3, value);
                buf = rest;
            }
            5 => buf = buf.get(4..)?,
            _ => return None,
        }
    }
    Some(())
}

/// User + system CPU seconds of a process so far (`/proc/PID/stat`).
///
/// # Errors
/// No such process.
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    // Fields after the command name (which may hold spaces): utime is field 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    Ok((ticks(11) + ticks(12)) / 100.0)
}
