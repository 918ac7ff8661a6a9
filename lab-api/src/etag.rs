//! `ETag` on successful reads and `If-None-Match` → 304, so a UI polling for changes gets an
//! empty answer when nothing changed.

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use crate::problem::ApiError;

/// A weak validator over the JSON body: weak, because compression changes the bytes sent.
pub fn tag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("W/\"{}\"", hex::encode(&digest[..16]))
}

/// Whether `If-None-Match` names `etag` (weak comparison, lists and `*` included).
pub fn matches(headers: &HeaderMap, etag: &str) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|candidate| candidate.trim() == "*" || opaque(candidate) == opaque(etag))
        })
}

pub async fn middleware(request: Request, next: Next) -> Response {
    let is_get = request.method() == Method::GET;
    let conditional = request.headers().clone();
    let response = next.run(request).await;
    if !is_get || response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return ApiError::Internal(format!("cannot buffer the response: {e}")).into_response()
        }
    };
    let etag = tag(&bytes);
    let value =
        HeaderValue::from_str(&etag).unwrap_or_else(|_| HeaderValue::from_static("W/\"0\""));
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if matches(&conditional, &etag) {
        let mut not_modified = Response::new(Body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        not_modified.headers_mut().insert(header::ETAG, value);
        not_modified
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return not_modified;
    }
    parts.headers.insert(header::ETAG, value);
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::IF_NONE_MATCH, v.parse().expect("header"));
        m
    }

    #[test]
    fn if_none_match_compares_weakly_and_accepts_lists() {
        let t = tag(b"[]");
        assert!(matches(&h(&t), &t));
        assert!(matches(&h(&t.replace("W/", "")), &t));
        assert!(matches(&h(&format!("\"x\", {t}")), &t));
        assert!(matches(&h("*"), &t));
        assert!(!matches(&h("\"other\""), &t));
        assert!(!matches(&HeaderMap::new(), &t));
        assert_ne!(tag(b"[]"), tag(b"[1]"));
    }
}
