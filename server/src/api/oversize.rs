//! tonic answers a message over the size limit itself, before any handler
//! runs, with OUT_OF_RANGE; gRPC (and `status.rs`) say RESOURCE_EXHAUSTED.
//! This wrapper around the Rootlet service rewrites such an answer with the
//! status `status::transport` gives it.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{
    Status,
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

use super::status;

/// A service whose transport-level statuses are mapped like the rest.
#[derive(Clone)]
pub struct Mapped<S> {
    inner: S,
}

impl<S> Mapped<S> {
    pub fn new(inner: S) -> Self {
        Mapped { inner }
    }
}

impl<S: NamedService> NamedService for Mapped<S> {
    const NAME: &'static str = S::NAME;
}

/// Rewrites the status of a trailers-only response (the status is in the
/// headers), if `status::transport` maps it.
fn remap(headers: &mut http::HeaderMap) {
    let Some(found) = Status::from_header_map(headers) else {
        return;
    };
    let Some(mapped) = status::transport(&found) else {
        return;
    };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    // Only fails for a message that cannot be a header value.
    if mapped.add_header(headers).is_err() {
        let _ = found.add_header(headers);
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Mapped<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(req);
        Box::pin(async move {
            let Ok(mut response) = call.await;
            remap(response.headers_mut());
            Ok(response)
        })
    }
}
