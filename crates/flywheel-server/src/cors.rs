//! CORS for browsers calling Flywheel from the product's own origin.
//!
//! Browsers call Flywheel with publishable keys from whatever origin the
//! product runs on. Keys travel in headers, never in cookies, so allowing
//! every origin exposes nothing a script could not already send.
//!
//! The policy is fixed, so every header value is a static: this is applied
//! inside the one request-edge middleware ([`crate::telemetry::track_http`])
//! rather than as tower-http's `CorsLayer`, whose service is cloned with
//! its whole configuration (and its `Vary` list allocated) on every request,
//! about 5 % of a `/v1/check` profile. The answers are the same as that
//! layer's with `allow_origin(Any)`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, VARY,
};
use axum::http::{HeaderMap, HeaderValue, Method, Response};

const ANY_ORIGIN: HeaderValue = HeaderValue::from_static("*");
const METHODS: HeaderValue = HeaderValue::from_static("GET,POST,DELETE,OPTIONS");
const REQUEST_HEADERS: HeaderValue = HeaderValue::from_static(
    "authorization,content-type,content-encoding,x-api-key,x-request-id,last-event-id,if-none-match",
);
const EXPOSED_HEADERS: HeaderValue = HeaderValue::from_static("x-request-id,retry-after,etag");
/// A day: browsers cap it lower anyway (Chrome: 2 h).
const MAX_AGE: HeaderValue = HeaderValue::from_static("86400");
/// Responses differ by these request headers (preflights, at least), so
/// caches must keep them apart.
const VARY_ON: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

/// A CORS preflight: `OPTIONS` naming the method it asks for.
pub fn is_preflight(request: &Request) -> bool {
    request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight: every origin, the methods and headers
/// Flywheel's clients send, cached for a day.
pub fn preflight() -> Response<Body> {
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, ANY_ORIGIN);
    headers.insert(ACCESS_CONTROL_ALLOW_METHODS, METHODS);
    headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, REQUEST_HEADERS);
    headers.insert(ACCESS_CONTROL_MAX_AGE, MAX_AGE);
    headers.append(VARY, VARY_ON);
    response
}

/// What every other response carries: any origin may read it, and the
/// headers a client needs (request id, `Retry-After`, `ETag`) are exposed.
pub fn add_headers(headers: &mut HeaderMap) {
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, ANY_ORIGIN);
    headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED_HEADERS);
    headers.append(VARY, VARY_ON);
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn request(method: Method, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().method(method).uri("/v1/events");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[test]
    fn only_an_options_request_naming_a_method_is_a_preflight() {
        assert!(is_preflight(&request(
            Method::OPTIONS,
            &[("access-control-request-method", "POST")]
        )));
        assert!(!is_preflight(&request(Method::OPTIONS, &[])));
        assert!(!is_preflight(&request(
            Method::POST,
            &[("access-control-request-method", "POST")]
        )));
    }

    #[test]
    fn a_preflight_allows_every_origin_and_the_clients_headers() {
        let response = preflight();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        let allowed = headers[ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
        for header in [
            "authorization",
            "content-type",
            "content-encoding",
            "x-api-key",
        ] {
            assert!(allowed.split(',').any(|h| h == header), "{header}");
        }
        assert!(headers[ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .unwrap()
            .contains("POST"));
        assert_eq!(headers[ACCESS_CONTROL_MAX_AGE], "86400");
        assert!(headers[VARY].to_str().unwrap().contains("origin"));
    }

    #[test]
    fn a_response_keeps_its_own_vary_and_gains_the_cors_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
        add_headers(&mut headers);
        assert_eq!(headers[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(
            headers[ACCESS_CONTROL_EXPOSE_HEADERS],
            "x-request-id,retry-after,etag"
        );
        assert_eq!(headers.get_all(VARY).iter().count(), 2);
    }
}
