//! The gate in front of each gRPC service: a service that is not there yet
//! (the Rootlet service while the agent adopts pinned state) answers
//! UNAVAILABLE; at shutdown, open response streams (Watch, KeepAlive, health
//! Watch, reflection) end with UNAVAILABLE so that tonic's graceful shutdown
//! does not wait for them forever, and calls still running when the grace
//! period is over are cut.

use std::{
    convert::Infallible,
    future::{Future, poll_fn},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::sync::watch;
use tonic::{
    Status,
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

/// Where the daemon is in its life, as the gates see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Serving,
    /// Shutting down: in-flight calls may finish; open streams end now.
    Draining,
    /// The grace period is over: calls still running are cut.
    Stopped,
}

/// The service behind a gate; `None` until it exists (and again after
/// shutdown, so that a lingering connection cannot keep the agent alive).
pub(crate) type Slot<S> = Arc<RwLock<Option<S>>>;

pub(crate) fn slot<S>(inner: Option<S>) -> Slot<S> {
    Arc::new(RwLock::new(inner))
}

pub(crate) fn set<S>(slot: &Slot<S>, inner: Option<S>) {
    *slot.write().unwrap_or_else(|p| p.into_inner()) = inner;
}

#[derive(Clone)]
pub(crate) struct Gate<S> {
    slot: Slot<S>,
    phase: watch::Receiver<Phase>,
    /// Why the service is unavailable while the slot is empty.
    absent: &'static str,
}

impl<S> Gate<S> {
    pub(crate) fn new(slot: Slot<S>, phase: watch::Receiver<Phase>, absent: &'static str) -> Self {
        Gate {
            slot,
            phase,
            absent,
        }
    }

    /// A gate in front of a service that is always there.
    pub(crate) fn always(inner: S, phase: watch::Receiver<Phase>) -> Self {
        Gate::new(slot(Some(inner)), phase, "not available")
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

fn unavailable(message: &'static str) -> http::Response<Body> {
    Status::unavailable(message).into_http()
}

/// Resolves once `phase` has reached `at_least` (or its sender is gone).
async fn reached(mut phase: watch::Receiver<Phase>, at_least: Phase) {
    let rank = |p: Phase| p as u8;
    let _ = phase.wait_for(|p| rank(*p) >= rank(at_least)).await;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.slot.read().unwrap_or_else(|p| p.into_inner()).clone();
        let phase = self.phase.clone();
        let absent = self.absent;
        Box::pin(async move {
            let Some(mut inner) = inner else {
                return Ok(unavailable(absent));
            };
            if *phase.borrow() == Phase::Stopped {
                return Ok(unavailable("rootletd is shutting down"));
            }
            let Ok(()) = poll_fn(|cx| inner.poll_ready(cx)).await;
            let call = inner.call(req);
            tokio::select! {
                response = call => {
                    let Ok(response) = response;
                    Ok(response.map(|body| Body::new(Cutoff::new(body, phase))))
                }
                () = reached(phase.clone(), Phase::Stopped) => {
                    Ok(unavailable("rootletd shut down before this call finished"))
                }
            }
        })
    }
}

/// A response body that ends with an UNAVAILABLE status once the daemon is
/// draining, if it is waiting for its next message then. A body whose
/// frames are ready (a finished unary response) is never cut.
struct Cutoff {
    inner: Body,
    draining: BoxFuture<()>,
    done: bool,
}

impl Cutoff {
    fn new(inner: Body, phase: watch::Receiver<Phase>) -> Self {
        Cutoff {
            inner,
            draining: Box::pin(reached(phase, Phase::Draining)),
            done: false,
        }
    }
}

impl HttpBody for Cutoff {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.done = frame.is_trailers();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(other) => {
                this.done = true;
                return Poll::Ready(other);
            }
            Poll::Pending => {}
        }
        if this.draining.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.done = true;
        let mut trailers = http::HeaderMap::new();
        // Only fails for a status whose message cannot be a header value.
        let _ = Status::unavailable("rootletd is shutting down").add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, StreamBody};
    use tokio_stream::StreamExt;

    use super::*;

    /// A service whose response is made by `respond`, after `delay` (None:
    /// never).
    #[derive(Clone)]
    struct Fixed {
        respond: fn() -> http::Response<Body>,
        delay: Option<Duration>,
    }

    impl NamedService for Fixed {
        const NAME: &'static str = "test.Fixed";
    }

    impl Service<http::Request<Body>> for Fixed {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: http::Request<Body>) -> Self::Future {
            let (respond, delay) = (self.respond, self.delay);
            Box::pin(async move {
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
                Ok(respond())
            })
        }
    }

    fn frame(data: &'static [u8]) -> Result<Frame<Bytes>, Status> {
        Ok(Frame::data(Bytes::from_static(data)))
    }

    fn ok_trailers() -> Result<Frame<Bytes>, Status> {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        Ok(Frame::trailers(t))
    }

    /// One message, then nothing ever again (a Watch stream).
    fn endless() -> http::Response<Body> {
        let frames = tokio_stream::iter([frame(b"first")]).chain(tokio_stream::pending());
        http::Response::new(Body::new(StreamBody::new(frames)))
    }

    /// One message and OK (a finished unary call).
    fn finished() -> http::Response<Body> {
        let frames = tokio_stream::iter([frame(b"only"), ok_trailers()]);
        http::Response::new(Body::new(StreamBody::new(frames)))
    }

    fn request() -> http::Request<Body> {
        http::Request::new(Body::empty())
    }

    fn grpc_status(headers: &http::HeaderMap) -> Option<&str> {
        headers.get("grpc-status").and_then(|v| v.to_str().ok())
    }

    async fn next_frame(body: &mut Body) -> Option<Frame<Bytes>> {
        tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame in time")
            .map(|f| f.expect("no body error"))
    }

    #[tokio::test]
    async fn an_absent_service_is_unavailable() {
        let (_phase, rx) = watch::channel(Phase::Serving);
        let mut gate = Gate::<Fixed>::new(slot(None), rx, "adopting; retry shortly");
        let r = gate.call(request()).await.unwrap();
        assert_eq!(grpc_status(r.headers()), Some("14"));
        assert_eq!(
            r.headers()
                .get("grpc-message")
                .and_then(|v| v.to_str().ok()),
            Some("adopting;%20retry%20shortly")
        );
    }

    #[tokio::test]
    async fn open_streams_end_with_unavailable_when_draining() {
        let (phase, rx) = watch::channel(Phase::Serving);
        let mut gate = Gate::always(
            Fixed {
                respond: endless,
                delay: Some(Duration::ZERO),
            },
            rx,
        );
        let mut body = gate.call(request()).await.unwrap().into_body();
        let first = next_frame(&mut body).await.unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), body.frame())
                .await
                .is_err(),
            "the stream waits while serving"
        );
        phase.send(Phase::Draining).unwrap();
        let last = next_frame(&mut body).await.unwrap();
        let trailers = last.into_trailers().unwrap();
        assert_eq!(grpc_status(&trailers), Some("14"));
        assert!(next_frame(&mut body).await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn finished_responses_are_not_cut() {
        let (phase, rx) = watch::channel(Phase::Serving);
        let mut gate = Gate::always(
            Fixed {
                respond: finished,
                delay: Some(Duration::ZERO),
            },
            rx,
        );
        let response = gate.call(request()).await.unwrap();
        phase.send(Phase::Draining).unwrap();
        let mut body = response.into_body();
        assert_eq!(
            next_frame(&mut body).await.unwrap().into_data().unwrap(),
            "only"
        );
        let trailers = next_frame(&mut body)
            .await
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(grpc_status(&trailers), Some("0"));
        assert!(next_frame(&mut body).await.is_none());
    }

    #[tokio::test]
    async fn calls_finish_while_draining_and_are_cut_when_stopped() {
        let (phase, rx) = watch::channel(Phase::Serving);
        let mut slow = Gate::always(
            Fixed {
                respond: finished,
                delay: Some(Duration::from_millis(100)),
            },
            rx.clone(),
        );
        let mut stuck = Gate::always(
            Fixed {
                respond: finished,
                delay: None,
            },
            rx,
        );
        let slow_call = tokio::spawn(slow.call(request()));
        let stuck_call = tokio::spawn(stuck.call(request()));
        phase.send(Phase::Draining).unwrap();
        let r = slow_call.await.unwrap().unwrap();
        assert_eq!(
            grpc_status(r.headers()),
            None,
            "a call in flight finishes while draining"
        );
        phase.send(Phase::Stopped).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), stuck_call)
            .await
            .expect("cut in time")
            .unwrap()
            .unwrap();
        assert_eq!(grpc_status(r.headers()), Some("14"));
        // New calls are refused once stopped.
        let r = slow.call(request()).await.unwrap();
        assert_eq!(grpc_status(r.headers()), Some("14"));
    }

    #[test]
    fn names_pass_through() {
        assert_eq!(<Gate<Fixed> as NamedService>::NAME, "test.Fixed");
    }
}
