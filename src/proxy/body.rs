//! Request-body wrapper that enforces the gateway's body limits while streaming: a maximum
//! total size and a maximum wait for each chunk (slow-body clients are cut off).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Why a streamed request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More bytes than `max_body_bytes`.
    #[error("request body exceeds the configured maximum")]
    TooLarge,
    /// No data within the body read timeout.
    #[error("request body stalled past the read timeout")]
    Stalled,
    /// The client's stream failed.
    #[error("client body: {0}")]
    Client(#[source] hyper::Error),
}

/// A client body with a size cap and a per-chunk read timeout.
pub struct GuardedBody {
    inner: hyper::body::Incoming,
    remaining: u64,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// True while we wait on the client: the timer measures only that wait, not the time the
    /// upstream takes before asking for more.
    waiting: bool,
}

impl GuardedBody {
    pub fn new(inner: hyper::body::Incoming, max: u64, timeout: Duration) -> Self {
        GuardedBody {
            inner,
            remaining: max,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            waiting: false,
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    this.remaining -= len;
                }
                this.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + this.timeout;
                    this.sleep.as_mut().reset(deadline);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Stalled))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
