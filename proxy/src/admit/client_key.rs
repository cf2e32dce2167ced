//! Who a request counts against.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::{header, HeaderMap};
use kache_config::ClientKeyConfig;

/// Who a request counts against: a bounded string (at most
/// [`ClientKey::MAX_LEN`] bytes), cheap to clone. Never a metrics label.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientKey(Arc<str>);

impl ClientKey {
    pub const MAX_LEN: usize = 256;

    /// A key from any string, cut to [`ClientKey::MAX_LEN`] bytes.
    pub fn new(key: &str) -> ClientKey {
        let mut end = key.len().min(Self::MAX_LEN);
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        ClientKey(Arc::from(&key[..end]))
    }

    /// The client a request comes from: the authenticated user where known
    /// (`user:<name>`); else the bearer token it presented (the proxy's access
    /// token), as a per-process fingerprint that cannot be turned back into
    /// the token, with its `User-Agent` (`token:<hex> <user-agent>`); else its
    /// peer address with its `User-Agent` (`<ip> <user-agent>`).
    ///
    /// The `User-Agent` keeps programs apart that share a token or an address
    /// — in local mode every client is on 127.0.0.1 and presents the same
    /// access token, and fairness between `kubectl` and a runaway script is the
    /// point. A client that varies its `User-Agent` gets several flows, which
    /// still cannot exceed its class's seats.
    pub fn identify(peer: SocketAddr, headers: &HeaderMap, user: Option<&str>) -> ClientKey {
        ClientKey::identify_with(peer, headers, user, &ClientKeyConfig::default())
    }

    /// [`ClientKey::identify`] under a configured key: a client-id header
    /// ranks after the user and before the token; the User-Agent may be left out.
    pub fn identify_with(
        peer: SocketAddr,
        headers: &HeaderMap,
        user: Option<&str>,
        config: &ClientKeyConfig,
    ) -> ClientKey {
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            return ClientKey::new(&format!("user:{user}"));
        }
        let named = config
            .header
            .as_deref()
            .and_then(|name| headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
            .filter(|v| !v.is_empty());
        if let Some(named) = named {
            return ClientKey::new(&format!("client:{named}"));
        }
        let agent = headers
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .filter(|v| !v.is_empty());
        let agent = if config.user_agent {
            format!(" {}", agent.as_deref().unwrap_or("-"))
        } else {
            String::new()
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match token {
            Some(token) => {
                static KEYS: OnceLock<RandomState> = OnceLock::new();
                let fingerprint = KEYS.get_or_init(RandomState::new).hash_one(token);
                ClientKey::new(&format!("token:{fingerprint:016x}{agent}"))
            }
            None => ClientKey::new(&format!("{}{agent}", peer.ip())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}
