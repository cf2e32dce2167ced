//! Faithful forwarding: the request and response as they are, minus
//! hop-by-hop headers and the client's credentials, plus
//! `Accept-Encoding: identity`; upgrades (exec, attach, port-forward) spliced
//! byte for byte once both sides switched protocols.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::Instrument;

use crate::admit::Permit;
use crate::authn::UpstreamAs;
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::upstream::{Exchange, Upstream};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the de-facto `proxy-connection` and `keep-alive`.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether a request asks to switch protocols (SPDY or WebSocket).
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() <= Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && connection_tokens(request.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// With `keep_upgrade`, `Connection: Upgrade` and `Upgrade` survive.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let upgrade = headers.get(header::UPGRADE).cloned();
    for name in named.iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        if let Some(upgrade) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(header::UPGRADE, upgrade);
        }
    }
}

/// Removes the headers an authenticating front proxy uses to name a user
/// (`--requestheader-*-headers`, by default `X-Remote-User`, `X-Remote-Group`,
/// `X-Remote-Extra-*`). The API server only believes them from a connection
/// with a front-proxy client certificate, but should kache's own certificate
/// ever be one, a client must not be able to name any user it likes.
fn strip_front_proxy_identity(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name == "x-remote-user" || name == "x-remote-group" || name.starts_with("x-remote-extra-")
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The request kache sends upstream for a client's request, made as `who`;
/// a body over `body_limit` bytes fails the exchange as the client's `413`.
pub fn upstream_request<B>(
    request: Request<B>,
    upgrade: bool,
    who: &UpstreamAs,
    body_limit: Option<u64>,
) -> Request<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    let (mut parts, incoming) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    strip_front_proxy_identity(&mut parts.headers);
    match who {
        // kache's own identity (from the kubeconfig), never the client's.
        UpstreamAs::Kubeconfig => {
            parts.headers.remove(header::AUTHORIZATION);
        }
        // The client's own credentials, over a connection without kache's.
        UpstreamAs::Client => {}
        // kache's identity acting as the authenticated user: the client's
        // credentials and impersonation headers make way for kache's.
        UpstreamAs::Impersonate(user) => {
            parts.headers.remove(header::AUTHORIZATION);
            let theirs: Vec<HeaderName> = parts
                .headers
                .keys()
                .filter(|name| name.as_str().starts_with("impersonate-"))
                .cloned()
                .collect();
            for name in theirs {
                parts.headers.remove(name);
            }
            for (name, value) in crate::authn::impersonation_headers(user) {
                parts.headers.append(name, value);
            }
        }
    }
    // `Host` named kache; the upstream's comes from its URL.
    parts.headers.remove(header::HOST);
    // Upstream::send asks for `identity`; the client's preference is not passed on.
    parts.headers.remove(header::ACCEPT_ENCODING);
    // Only the path and query travel; the base-URI layer adds scheme and authority.
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| http::Uri::from(pq.clone()))
        .unwrap_or_else(|| http::Uri::from_static("/"));
    // The upstream connection negotiates its own version.
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    Request::from_parts(parts, body::stream(body::ClientBody::new(incoming, body_limit)))
}

/// The response the client gets for the upstream's response.
pub fn client_response(response: Response<Incoming>) -> Response<Body> {
    let (mut parts, incoming) = response.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, switching);
    parts.extensions = http::Extensions::new();
    Response::from_parts(parts, body::stream(incoming))
}

/// How a forwarded exchange is bounded.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Watch, logs, exec, proxy: no timeout on the response head.
    pub long_running: bool,
    /// Bytes of request body the API server accepts (its `413` above).
    pub body: Option<u64>,
}

/// Forwards a request and streams the answer back. The admission permit
/// (if any) is held until the response body ends, or, for an upgraded
/// connection, until the connection closes.
///
/// # Errors
/// See [`Upstream::send`].
pub async fn forward(
    upstream: &Upstream,
    mut request: Request<Incoming>,
    who: &UpstreamAs,
    limits: Limits,
    permit: Option<Permit>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Result<Response<Body>, ProxyError> {
    let Limits {
        long_running,
        body: body_limit,
    } = limits;
    let hold = |response: Response<Body>, permit: Option<Permit>| match permit {
        Some(permit) => response.map(|body| permit.attach(body)),
        None => response,
    };
    if !is_upgrade(&request) {
        let exchange = if long_running {
            Exchange::LongRunning
        } else {
            Exchange::Short
        };
        let response = upstream
            .send(upstream_request(request, false, who, body_limit), exchange)
            .await?;
        return Ok(hold(client_response(response), permit));
    }

    let client_upgrade = hyper::upgrade::on(&mut request);
    let mut response = upstream
        .send(upstream_request(request, true, who, None), Exchange::LongRunning)
        .await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(hold(client_response(response), permit));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let mut shutdown = shutdown.clone();
    tokio::spawn(
        async move {
            // The session counts against the client's long-running cap until it closes.
            let _permit = permit;
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::info!(%error, "upgrade abandoned");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            // At shutdown the session gets the drain's grace period, then is closed.
            let deadline = async {
                let _ = shutdown.wait_for(|stop| *stop).await;
                tokio::time::sleep(crate::server::GRACEFUL_SHUTDOWN_TIMEOUT).await;
            };
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                    Ok((up, down)) => tracing::debug!(bytes_up = up, bytes_down = down, "upgraded stream closed"),
                    Err(error) => tracing::debug!(%error, "upgraded stream ended"),
                },
                _ = deadline => tracing::info!("upgraded stream closed at shutdown"),
            }
        }
        .in_current_span(),
    );
    Ok(client_response(response))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header map from name/value pairs, in order.
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-trace"),
            ("keep-alive", "timeout=5"),
            ("x-trace", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("accept", "application/json"),
            ("impersonate-user", "alice"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let left: Vec<_> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept", "impersonate-user"]);
    }

    #[test]
    fn upstream_requests_carry_no_client_credentials_and_ask_for_identity() {
        let request = Request::builder()
            .method("POST")
            .uri("http://localhost:8001/api/v1/namespaces/a/pods?dryRun=All&fieldManager=x%2Fy")
            .version(Version::HTTP_2)
            .header(header::AUTHORIZATION, "Bearer client-token")
            .header(header::ACCEPT_ENCODING, "gzip, deflate")
            .header(header::HOST, "localhost:8001")
            .header("impersonate-user", "alice")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .expect("request");
        let sent = upstream_request(request, false, &UpstreamAs::Kubeconfig, None);
        assert_eq!(
            sent.uri(),
            "/api/v1/namespaces/a/pods?dryRun=All&fieldManager=x%2Fy"
        );
        assert_eq!(sent.method(), "POST");
        assert_eq!(sent.version(), Version::HTTP_11);
        assert!(!sent.headers().contains_key(header::AUTHORIZATION));
        assert!(!sent.headers().contains_key(header::HOST));
        assert!(
            !sent.headers().contains_key(header::ACCEPT_ENCODING),
            "Upstream::send sets identity"
        );
        assert_eq!(sent.headers()["impersonate-user"], "alice");
    }

    #[test]
    fn impersonating_requests_carry_kaches_headers_in_place_of_the_clients() {
        let request = || {
            Request::builder()
                .uri("/api/v1/namespaces/a/pods")
                .header(header::AUTHORIZATION, "Bearer client-token")
                .header("impersonate-user", "admin")
                .header("impersonate-group", "system:masters")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request")
        };
        let alice = kache_cache::rbac::UserInfo {
            name: "alice".into(),
            groups: vec!["system:authenticated".into()],
            ..Default::default()
        };
        let sent = upstream_request(
            request(),
            false,
            &UpstreamAs::Impersonate(std::sync::Arc::new(alice)),
            None,
        );
        assert!(!sent.headers().contains_key(header::AUTHORIZATION));
        assert_eq!(sent.headers()["impersonate-user"], "alice");
        let groups: Vec<_> = sent.headers().get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["system:authenticated"]);

        let sent = upstream_request(request(), false, &UpstreamAs::Client, None);
        assert_eq!(sent.headers()[header::AUTHORIZATION], "Bearer client-token");
        assert_eq!(sent.headers()["impersonate-user"], "admin");
    }

    #[test]
    fn front_proxy_identity_headers_never_reach_the_api_server() {
        for who in [UpstreamAs::Kubeconfig, UpstreamAs::Client] {
            let request = Request::builder()
                .uri("/api/v1/secrets")
                .header("x-remote-user", "admin")
                .header("x-remote-group", "system:masters")
                .header("x-remote-extra-scopes", "all")
                .header("x-request-id", "kept")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let sent = upstream_request(request, false, &who, None);
            let names: Vec<_> = sent.headers().keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-request-id"], "{who:?}");
        }
    }

    #[test]
    fn websocket_and_spdy_requests_are_upgrades() {
        let upgrade = |connection: &str, version: Version| {
            let request = Request::builder()
                .version(version)
                .header(header::CONNECTION, connection)
                .header(header::UPGRADE, "websocket")
                .body(())
                .expect("request");
            is_upgrade(&request)
        };
        assert!(upgrade("Upgrade", Version::HTTP_11));
        assert!(upgrade("keep-alive, upgrade", Version::HTTP_11));
        assert!(!upgrade("keep-alive", Version::HTTP_11));
        assert!(!upgrade("Upgrade", Version::HTTP_2));
    }

    #[test]
    fn upgrade_headers_survive_only_for_upgrades() {
        let original = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
        ]);
        let mut kept = original.clone();
        strip_hop_by_hop(&mut kept, true);
        assert_eq!(kept[header::CONNECTION], "Upgrade");
        assert_eq!(kept[header::UPGRADE], "SPDY/3.1");
        assert_eq!(kept["x-stream-protocol-version"], "v4.channel.k8s.io");
        let mut dropped = original;
        strip_hop_by_hop(&mut dropped, false);
        assert!(!dropped.contains_key(header::UPGRADE));
        assert!(!dropped.contains_key(header::CONNECTION));
    }
}
