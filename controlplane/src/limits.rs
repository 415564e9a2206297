//! The operator API's message-size limit. tonic refuses a message whose length prefix exceeds the decode limit
//! before buffering it, but answers OUT_OF_RANGE; gRPC's own implementations answer RESOURCE_EXHAUSTED, which is what
//! clients (and grpcurl users) expect, so [`ResourceExhausted`] rewrites that one answer.

use fhirgw_config::resource::MAX_RESOURCE_BYTES;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;

/// The largest admin request: one object at its limit plus the request's other fields. Anything larger is refused
/// from its 5-byte length prefix, before it is read, so concurrent oversized calls cost no memory.
pub const MAX_ADMIN_MESSAGE_BYTES: usize = MAX_RESOURCE_BYTES + 4 * 1024;

const TOO_LARGE: &str = "Error, decoded message length too large";

/// Wraps a gRPC service; answers a message over the decode limit with RESOURCE_EXHAUSTED.
#[derive(Clone)]
pub struct ResourceExhausted<S>(pub S);

impl<S: NamedService> NamedService for ResourceExhausted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for ResourceExhausted<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let future = self.0.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            rewrite(response.headers_mut());
            Ok(response)
        })
    }
}

fn rewrite(headers: &mut http::HeaderMap) {
    let too_large = tonic::Status::from_header_map(headers)
        .is_some_and(|s| s.code() == tonic::Code::OutOfRange && s.message().starts_with(TOO_LARGE));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_decode_limit_becomes_resource_exhausted() {
        let cases = [
            (
                tonic::Status::out_of_range(format!("{TOO_LARGE}: found 15000000 bytes, the limit is: 1052672 bytes")),
                tonic::Code::ResourceExhausted,
            ),
            (tonic::Status::out_of_range("something else"), tonic::Code::OutOfRange),
            (tonic::Status::invalid_argument(TOO_LARGE), tonic::Code::InvalidArgument),
        ];
        for (status, want) in cases {
            let mut response: http::Response<()> = status.into_http();
            rewrite(response.headers_mut());
            let got = tonic::Status::from_header_map(response.headers()).map(|s| s.code());
            assert_eq!(got, Some(want));
        }
    }
}
