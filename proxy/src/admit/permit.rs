//! The right to send a request upstream, released when dropped.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use kache_cache::chunk::Chunk;
use kache_config::EXEMPT_CLASS;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use super::{client_key::ClientKey, queue::Class};
use crate::body::{Body, BoxError};
use crate::ledger::Account;

/// The right to have one request in flight upstream. Dropping it releases
/// its seat (or long-running slot) and hands the seat to the next waiting
/// request.
#[must_use = "the seat is released as soon as the permit is dropped"]
pub struct Permit {
    pub(super) held: Held,
    /// The ledger account the seat's time is charged to.
    pub(super) charged: Option<Arc<Account>>,
}

pub(super) enum Held {
    Exempt(Gauge),
    Counted {
        class: Arc<Class>,
        key: ClientKey,
        kind: Kind,
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Short,
    LongRunning,
}

impl Permit {
    pub(super) fn new(class: Arc<Class>, key: ClientKey, kind: Kind) -> Permit {
        Permit {
            held: Held::Counted {
                class,
                key,
                kind,
                since: Instant::now(),
            },
            charged: None,
        }
    }

    /// Charges the seat's time to a client's account in the cost ledger,
    /// when it is released (exempt and long-running requests hold no seat).
    pub fn charge_to(&mut self, account: Arc<Account>) {
        self.charged = Some(account);
    }

    /// The class the request was admitted in (`exempt` for exempt requests).
    pub fn class(&self) -> &str {
        match &self.held {
            Held::Exempt(_) => EXEMPT_CLASS,
            Held::Counted { class, .. } => &class.name,
        }
    }

    /// Ties the permit to a response body: it is released when the body has
    /// yielded its last frame, fails, or is dropped unfinished. For upgraded
    /// connections (exec, port-forward), move the permit into the task that
    /// splices them instead.
    pub fn attach(self, body: Body) -> Body {
        PermitBody {
            inner: body,
            permit: Some(self),
        }
        .boxed_unsync()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match &self.held {
            Held::Exempt(executing) => {
                executing.dec();
            }
            Held::Counted {
                class,
                key,
                kind,
                since,
            } => {
                if *kind == Kind::Short {
                    let held = since.elapsed();
                    class.metrics.execution.observe(held.as_secs_f64());
                    if let Some(account) = &self.charged {
                        account.held_seat(held);
                    }
                }
                class.release(key, *kind);
            }
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Permit");
        debug.field("class", &self.class());
        if let Held::Counted { key, kind, .. } = &self.held {
            debug.field("client", key).field("kind", kind);
        }
        debug.finish()
    }
}

/// A body that holds a [`Permit`] until it ends.
pub(super) struct PermitBody {
    pub(super) inner: Body,
    pub(super) permit: Option<Permit>,
}

impl http_body::Body for PermitBody {
    type Data = Chunk;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunk>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(None | Some(Err(_))) => true,
        };
        if ended {
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
