//! Another origin on loopback that records every request it gets: where a redirect would send
//! a client, so tests can show that nothing went there.

use std::sync::{Arc, Mutex};

/// A server at [`Origin::url`] answering every request with `answer`.
#[derive(Debug)]
pub struct Origin {
    pub url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    pub async fn start(answer: serde_json::Value) -> Self {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method, uri: axum::http::Uri, body: String| {
                let (log, answer) = (log.clone(), answer.clone());
                async move {
                    if let Ok(mut log) = log.lock() {
                        log.push(format!("{method} {uri} {body}"));
                    }
                    axum::Json(answer)
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, seen }
    }

    /// Every request received so far: method, path and body.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
