//! `ETag` on successful reads and `If-None-Match` → 304, so a UI polling for changes gets an
//! empty answer when nothing changed. The tag is a weak validator (compression changes the
//! bytes sent) over the JSON body, computed while the handler writes it.

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};

use crate::{auth::Caller, problem::ApiError};

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

/// A JSON body and its ETag, computed while the body is written: no second copy, no buffering
/// in the middleware.
#[derive(Debug)]
pub struct Tagged {
    body: Vec<u8>,
    hasher: Sha256,
    items: usize,
}

impl std::io::Write for Tagged {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(data);
        self.body.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Tagged {
    /// One value as JSON.
    pub fn json(value: &impl serde::Serialize) -> Result<Self, ApiError> {
        let mut t = Self::empty();
        t.write(value)?;
        Ok(t)
    }

    /// A JSON array written one item at a time (see [`Tagged::push`], [`Tagged::close`]).
    pub fn array() -> Self {
        let mut t = Self::empty();
        t.raw(b"[");
        t
    }

    /// Appends an item to an array begun with [`Tagged::array`].
    pub fn push(&mut self, item: &impl serde::Serialize) -> Result<(), ApiError> {
        if self.items > 0 {
            self.raw(b",");
        }
        self.items += 1;
        self.write(item)
    }

    /// Ends an array begun with [`Tagged::array`].
    pub fn close(mut self) -> Self {
        self.raw(b"]");
        self
    }

    /// Items pushed so far.
    pub fn len(&self) -> usize {
        self.items
    }

    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    fn empty() -> Self {
        Self {
            body: Vec::new(),
            hasher: Sha256::new(),
            items: 0,
        }
    }

    fn raw(&mut self, bytes: &[u8]) {
        let _ = std::io::Write::write_all(self, bytes);
    }

    fn write(&mut self, value: &impl serde::Serialize) -> Result<(), ApiError> {
        serde_json::to_writer(&mut *self, value)
            .map_err(|e| ApiError::Internal(format!("cannot write the response: {e}")))
    }
}

impl IntoResponse for Tagged {
    fn into_response(self) -> Response {
        let digest = self.hasher.finalize();
        let etag = format!("W/\"{}\"", hex::encode(&digest[..16]));
        let mut response = Response::new(Body::from(self.body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, v);
        }
        response
    }
}

/// Answers `304 Not Modified` when `If-None-Match` names the ETag a handler gave its body;
/// marks tagged bodies `Cache-Control: no-cache` (revalidate every time). Never reads a body.
pub async fn middleware(request: Request, next: Next) -> Response {
    let is_get = request.method() == Method::GET;
    let conditional = request.headers().clone();
    let view = view_of(request.extensions().get::<Caller>());
    let mut response = next.run(request).await;
    if !is_get || response.status() != StatusCode::OK {
        return response;
    }
    let Some(etag) = response.headers().get(header::ETAG).cloned() else {
        return response;
    };
    // The tag names the caller's view too: one caller's tag never confirms another's answer.
    let etag = etag
        .to_str()
        .ok()
        .and_then(|t| HeaderValue::from_str(&per_view(t, &view)).ok())
        .unwrap_or(etag);
    if etag.to_str().is_ok_and(|tag| matches(&conditional, tag)) {
        let mut not_modified = Response::new(Body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        not_modified.headers_mut().insert(header::ETAG, etag);
        private(not_modified.headers_mut());
        return not_modified;
    }
    response.headers_mut().insert(header::ETAG, etag);
    private(response.headers_mut());
    response
}

/// Answers depend on who asks: caches keep them per credential, browsers revalidate.
fn private(headers: &mut HeaderMap) {
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Authorization, Cookie"),
    );
}

/// Whose view an answer is: everything, or one user's.
fn view_of(caller: Option<&Caller>) -> String {
    match caller {
        None | Some(Caller::Anyone) => "*".to_owned(),
        Some(Caller::Known(who)) if who.fleet_admin => "*".to_owned(),
        Some(Caller::Known(who)) => format!("u:{}", who.username),
    }
}

/// The body's tag bound to a view.
fn per_view(etag: &str, view: &str) -> String {
    let mut h = Sha256::new();
    h.update(view.as_bytes());
    h.update([0]);
    h.update(etag.as_bytes());
    format!("W/\"{}\"", hex::encode(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::IF_NONE_MATCH, v.parse().expect("header"));
        m
    }

    fn tag(value: &serde_json::Value) -> String {
        Tagged::json(value)
            .expect("writes")
            .into_response()
            .headers()[header::ETAG]
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    #[test]
    fn an_array_written_item_by_item_is_the_json_of_the_whole() {
        let mut a = Tagged::array();
        for i in 0..3 {
            a.push(&serde_json::json!({ "n": i })).expect("writes");
        }
        let a = a.close();
        let whole = serde_json::json!([{ "n": 0 }, { "n": 1 }, { "n": 2 }]);
        assert_eq!(a.body, serde_json::to_vec(&whole).expect("json"));
        assert_eq!(a.into_response().headers()[header::ETAG], tag(&whole));
        assert_eq!(Tagged::array().close().body, b"[]");
    }

    #[test]
    fn if_none_match_compares_weakly_and_accepts_lists() {
        let t = tag(&serde_json::json!([]));
        assert!(matches(&h(&t), &t));
        assert!(matches(&h(&t.replace("W/", "")), &t));
        assert!(matches(&h(&format!("\"x\", {t}")), &t));
        assert!(matches(&h("*"), &t));
        assert!(!matches(&h("\"other\""), &t));
        assert!(!matches(&HeaderMap::new(), &t));
        assert_ne!(tag(&serde_json::json!([])), tag(&serde_json::json!([1])));
    }
}
