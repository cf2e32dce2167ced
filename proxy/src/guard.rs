//! The local-mode guard: only the clients a loopback proxy is meant for get
//! through. Checks the `Host` header against accepted names (against DNS
//! rebinding, as `kubectl proxy --accept-hosts` does), refuses browsers'
//! cross-origin requests and CORS preflights, and checks the optional access
//! token.

use http::{header, Method, Request};
use kache_config::ListenerConfig;

use crate::error::ProxyError;

/// The admission rules of the main listener.
#[derive(Debug, Clone)]
pub struct LocalGuard {
    accept_any_host: bool,
    accept_hosts: Vec<String>,
    access_token: Option<String>,
}

impl LocalGuard {
    pub fn new(config: &ListenerConfig) -> LocalGuard {
        LocalGuard {
            accept_any_host: config.accept_hosts.iter().any(|h| h == "*"),
            accept_hosts: config.accept_hosts.clone(),
            access_token: config.access_token.clone(),
        }
    }

    /// Lets a request through, or says why not.
    ///
    /// # Errors
    /// A `Host` or `Origin` that is not accepted, a CORS preflight, a missing
    /// or wrong access token.
    pub fn check<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
        let host = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        if let Some(host) = host {
            if !self.accepts(&host) {
                return Err(ProxyError::HostNotAccepted(host));
            }
        }
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
            let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or(&origin);
            if !self.accepts(origin_host) || is_preflight(request) {
                return Err(ProxyError::CrossOrigin(origin));
            }
        }
        if let Some(expected) = &self.access_token {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), expected.as_bytes())) {
                return Err(ProxyError::Unauthorized);
            }
        }
        Ok(())
    }

    fn accepts(&self, host_and_port: &str) -> bool {
        if self.accept_any_host {
            return true;
        }
        let host = strip_port(host_and_port).to_ascii_lowercase();
        self.accept_hosts.contains(&host)
    }
}

fn is_preflight<B>(request: &Request<B>) -> bool {
    request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// `host:port` → `host`; `[::1]:8001` → `[::1]`; a bare IPv6 address stays whole.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str], token: Option<&str>) -> LocalGuard {
        LocalGuard {
            accept_any_host: hosts.contains(&"*"),
            accept_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            access_token: token.map(str::to_string),
        }
    }

    fn request(pairs: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/api");
        for (k, v) in pairs {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request")
    }

    const LOOPBACK: &[&str] = &["localhost", "127.0.0.1", "[::1]", "::1"];

    #[test]
    fn loopback_hosts_are_accepted_with_or_without_port() {
        let g = guard(LOOPBACK, None);
        for host in [
            "localhost",
            "localhost:8001",
            "127.0.0.1:8001",
            "[::1]:8001",
            "LOCALHOST:1",
        ] {
            assert!(g.check(&request(&[("host", host)])).is_ok(), "{host}");
        }
        assert!(g.check(&request(&[])).is_ok(), "no Host at all is not a browser");
    }

    #[test]
    fn other_hosts_are_refused_as_dns_rebinding() {
        let g = guard(LOOPBACK, None);
        for host in [
            "evil.example",
            "evil.example:8001",
            "127.0.0.1.evil.example",
            "localhost.evil:80",
        ] {
            let err = g.check(&request(&[("host", host)])).expect_err(host);
            assert_eq!(err.status(), 403, "{host}");
        }
        assert!(guard(&["*"], None)
            .check(&request(&[("host", "evil.example")]))
            .is_ok());
    }

    #[test]
    fn foreign_origins_and_preflights_are_refused() {
        let g = guard(LOOPBACK, None);
        let foreign = request(&[("host", "localhost"), ("origin", "https://evil.example")]);
        assert_eq!(g.check(&foreign).expect_err("foreign").status(), 403);
        let mut preflight = request(&[
            ("host", "localhost"),
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "DELETE"),
        ]);
        *preflight.method_mut() = Method::OPTIONS;
        assert_eq!(g.check(&preflight).expect_err("preflight").status(), 403);
    }

    #[test]
    fn the_access_token_is_required_when_configured() {
        let g = guard(LOOPBACK, Some("s3cret"));
        assert!(g.check(&request(&[("authorization", "Bearer s3cret")])).is_ok());
        for auth in ["Bearer wrong", "Bearer s3cre", "Basic s3cret", ""] {
            let err = g.check(&request(&[("authorization", auth)])).expect_err(auth);
            assert_eq!(err.status(), 401, "{auth}");
        }
        assert_eq!(g.check(&request(&[])).expect_err("none").status(), 401);
    }
}
