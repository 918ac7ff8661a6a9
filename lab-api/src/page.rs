//! The live page (`GET /`, `/live.js`, `/live.css`): HTML, script and style built into the
//! binary, served open (they hold no data: the page reads the API with the browser's
//! credentials) under a Content-Security-Policy that allows nothing but this origin.

use axum::{
    http::{header, HeaderName, HeaderValue},
    response::IntoResponse,
    routing::get,
    Router,
};

/// The paths of the page, for the metrics' closed set of routes.
pub const PATHS: [&str; 3] = ["/", "/live.js", "/live.css"];

const HTML: &str = include_str!("../assets/live.html");
const SCRIPT: &str = include_str!("../assets/live.js");
const STYLE: &str = include_str!("../assets/live.css");

/// Scripts, styles and connections of this origin only; no inline script, no frames, no forms.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                HeaderName::from_static("referrer-policy"),
                HeaderValue::from_static("no-referrer"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
}

/// The page's routes.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", HTML) }),
        )
        .route(
            "/live.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/live.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets_and_sets_text_only() {
        assert!(HTML.contains(r#"<script src="/live.js" defer></script>"#));
        assert!(HTML.contains(r#"href="/live.css""#));
        assert!(
            !HTML.contains("http://") && !HTML.contains("https://"),
            "no CDN"
        );
        // Data reaches the DOM as text: no HTML sinks in the script.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(sink), "{sink}");
        }
        assert!(SCRIPT.contains("new EventSource('/api/events/stream'"));
    }
}
