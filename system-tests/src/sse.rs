//! A client of lab-api's event stream for tests: opens `GET /api/events/stream` and reads it
//! frame by frame (`id:`, `event:`, `data:` lines up to a blank line), as a browser would.

use std::time::Duration;

use serde_json::Value;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseFrame {
    pub id: Option<String>,
    pub event: String,
    /// The `data:` line, parsed: the envelope `{type, source, time, data}`.
    pub envelope: Value,
}

impl SseFrame {
    /// The envelope's `data`.
    pub fn data(&self) -> &Value {
        &self.envelope["data"]
    }
}

/// An open stream.
#[derive(Debug)]
pub struct SseStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    ended: bool,
}

/// How a stream could not be read on.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing came within the time given.
    Quiet,
    /// The server ended the stream.
    Ended,
}

impl SseStream {
    /// Opens the stream at `url` (query included) with `headers`; a response other than 200
    /// is handed back as it is.
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> Result<Self, reqwest::Response> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("http client");
        let mut req = client.get(url).header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = req.send().await.expect("request the event stream");
        if response.status() != 200 {
            return Err(response);
        }
        Ok(Self {
            response,
            buffer: Vec::new(),
            ended: false,
        })
    }

    /// The stream's response headers.
    pub fn headers(&self) -> &reqwest::header::HeaderMap {
        self.response.headers()
    }

    /// The next frame, waiting at most `wait` for it.
    pub async fn next(&mut self, wait: Duration) -> Result<SseFrame, Next> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(frame) = self.take_frame() {
                return Ok(frame);
            }
            if self.ended {
                return Err(Next::Ended);
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return Err(Next::Quiet),
                Ok(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Ok(None)) | Ok(Err(_)) => self.ended = true,
            }
        }
    }

    /// The next frame; panics when none comes within `wait`.
    pub async fn expect(&mut self, wait: Duration) -> SseFrame {
        match self.next(wait).await {
            Ok(f) => f,
            Err(e) => panic!("no frame within {wait:?}: {e:?}"),
        }
    }

    /// Frames until `done` says the last one read completes them (it is included); panics
    /// when the stream ends or stays quiet past `wait` first.
    pub async fn until(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&[SseFrame]) -> bool,
    ) -> Vec<SseFrame> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(f) => frames.push(f),
                Err(e) => panic!(
                    "{e:?} after {} frames: {:?}",
                    frames.len(),
                    frames.iter().map(|f| &f.event).collect::<Vec<_>>()
                ),
            }
            if done(&frames) {
                return frames;
            }
        }
    }

    fn take_frame(&mut self) -> Option<SseFrame> {
        let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
        let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
        let text = String::from_utf8(raw).expect("frames are UTF-8");
        let mut frame = SseFrame {
            id: None,
            event: "message".into(),
            envelope: Value::Null,
        };
        for line in text.lines() {
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            match field {
                "id" => frame.id = Some(value.to_owned()),
                "event" => frame.event = value.to_owned(),
                "data" => {
                    frame.envelope = serde_json::from_str(value)
                        .unwrap_or_else(|e| panic!("data is not JSON ({e}): {value}"))
                }
                _ => {}
            }
        }
        Some(frame)
    }
}

/// Frames with ids (the events; `connected`, `heartbeat` and `reset` have none).
pub fn with_ids(frames: &[SseFrame]) -> Vec<&SseFrame> {
    frames.iter().filter(|f| f.id.is_some()).collect()
}

/// How many frames are of `event`.
pub fn count(frames: &[SseFrame], event: &str) -> usize {
    frames.iter().filter(|f| f.event == event).count()
}
