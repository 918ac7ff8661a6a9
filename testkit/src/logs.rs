//! Log events of code under test in this process: a JSON subscriber installed once per test
//! binary, whose lines tests read back by their `event` field.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use serde_json::Value;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this process from the first call on, as JSON.
#[derive(Clone)]
pub struct Logs(Buffer);

impl std::fmt::Debug for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Logs")
    }
}

impl Logs {
    /// Installs the capturing subscriber (once per process) and returns the shared log.
    pub fn capture() -> Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let buffer = Buffer::default();
            let writer = buffer.clone();
            let _ = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .try_init();
            Logs(buffer)
        })
        .clone()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Value> {
        let bytes = self.0 .0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The lines whose `event` field is `event`.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["event"] == event)
            .collect()
    }
}
