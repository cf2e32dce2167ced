//! One upstream call shared by concurrent askers of the API server's
//! current resourceVersion (a streaming list without a version needs it,
//! and fifty informers starting together would otherwise ask fifty times).
//!
//! The version must be at least what the API server would answer when the
//! request arrived (a consistent read), so a request shares only a call
//! *started after it arrived*: one that arrives while a call is on its way
//! waits for it to end and then shares the next (as the coalescer gathers
//! for forwarded reads).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

/// Orders arrivals and call starts.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// The call on its way, if any.
#[derive(Debug, Default)]
pub struct Flight {
    current: Mutex<Option<Call>>,
}

enum Turn {
    Start(watch::Sender<Option<Result<u64, String>>>, u64),
    Wait(watch::Receiver<Option<Result<u64, String>>>, bool),
}

#[derive(Debug)]
struct Call {
    started: u64,
    answer: watch::Receiver<Option<Result<u64, String>>>,
}

impl Flight {
    /// The answer of a `fetch` started after this call: this caller's own
    /// (`fetch` runs in its task), or one it shares with concurrent callers.
    ///
    /// # Errors
    /// The fetch's error (shared like its answer).
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<u64, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<u64, String>>,
    {
        let arrived = SEQUENCE.fetch_add(1, Ordering::SeqCst);
        loop {
            let turn = {
                let mut current = self.lock();
                match current.as_ref() {
                    Some(call) => Turn::Wait(call.answer.clone(), call.started > arrived),
                    None => {
                        let (sender, answer) = watch::channel(None);
                        let started = SEQUENCE.fetch_add(1, Ordering::SeqCst);
                        *current = Some(Call { started, answer });
                        Turn::Start(sender, started)
                    }
                }
            };
            match turn {
                Turn::Start(sender, started) => {
                    let clear = ClearOnDrop {
                        flight: self,
                        started,
                    };
                    let result = fetch().await;
                    // Cleared before answering: whoever wakes up and loops
                    // finds no call, or a newer one.
                    drop(clear);
                    sender.send_replace(Some(result.clone()));
                    return result;
                }
                Turn::Wait(mut answer, started_after) => {
                    // Answered, or abandoned (its caller went away): then
                    // the next one is started (or joined) in the next turn.
                    let result = answer
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|a| a.clone());
                    if let (Some(result), true) = (result, started_after) {
                        return result;
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Call>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Ends a call's turn, answered or abandoned (its caller went away): the
/// next caller starts a new one.
struct ClearOnDrop<'a> {
    flight: &'a Flight,
    started: u64,
}

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        let mut current = self.flight.lock();
        if current.as_ref().is_some_and(|call| call.started == self.started) {
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A fetch that takes a second and answers its call's number.
    fn numbered(calls: &Arc<AtomicUsize>) -> impl Future<Output = Result<u64, String>> {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(n as u64)
        }
    }

    /// A caller of `flight` in a task of its own, `fetch` its fetch.
    fn spawn_get<F, Fut>(flight: &Arc<Flight>, fetch: F) -> tokio::task::JoinHandle<Result<u64, String>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, String>> + Send,
    {
        let flight = flight.clone();
        tokio::spawn(async move { flight.get(fetch).await })
    }

    /// [`spawn_get`] with a [`numbered`] fetch.
    fn spawn_numbered(
        flight: &Arc<Flight>,
        calls: &Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<Result<u64, String>> {
        let calls = calls.clone();
        spawn_get(flight, move || numbered(&calls))
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_next_call_never_one_sent_before_they_arrived() {
        let flight = Arc::new(Flight::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let first = spawn_numbered(&flight, &calls);
        tokio::task::yield_now().await;
        // Twenty more arrive while the first call is on its way.
        let rest: Vec<_> = (0..20).map(|_| spawn_numbered(&flight, &calls)).collect();
        assert_eq!(first.await.expect("task"), Ok(1));
        for caller in rest {
            assert_eq!(
                caller.await.expect("task"),
                Ok(2),
                "the call started after it arrived"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // One after they all ended starts afresh.
        assert_eq!(flight.get(|| numbered(&calls)).await, Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_shared_like_an_answer() {
        let flight = Arc::new(Flight::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let blocker = spawn_numbered(&flight, &calls);
        tokio::task::yield_now().await;
        let failing = |calls: Arc<AtomicUsize>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err::<u64, _>("refused".to_string())
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let calls = calls.clone();
                spawn_get(&flight, move || failing(calls))
            })
            .collect();
        assert_eq!(blocker.await.expect("task"), Ok(1));
        for waiter in waiters {
            assert_eq!(waiter.await.expect("task"), Err("refused".to_string()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_caller_left_is_started_again_by_the_next() {
        let flight = Arc::new(Flight::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let abandoned = spawn_get(&flight, std::future::pending::<Result<u64, String>>);
        tokio::task::yield_now().await;
        let waiter = spawn_numbered(&flight, &calls);
        tokio::task::yield_now().await;
        abandoned.abort();
        assert_eq!(
            waiter.await.expect("task"),
            Ok(1),
            "its own call, once the other was given up"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
