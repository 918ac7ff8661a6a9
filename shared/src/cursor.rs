//! Opaque page cursors: a position in a listing as a JSON array, base64url-encoded. Only the
//! exact text this API issues decodes (no second spelling of a position is accepted).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde_json::Value;

use crate::{Error, Result};

/// The opaque text of a position.
pub fn encode(position: &Value) -> String {
    // Rendering a JSON value cannot fail, unlike serialising through serde.
    URL_SAFE_NO_PAD.encode(position.to_string())
}

/// The position `encode` gave `text`; any other text is [`Error::InvalidCursor`].
pub fn decode(text: &str) -> Result<Value> {
    if text.len() > MAX_ENCODED_LEN {
        return Err(Error::InvalidCursor);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| Error::InvalidCursor)?;
    let position: Value = serde_json::from_slice(&bytes).map_err(|_| Error::InvalidCursor)?;
    if encode(&position) != text {
        return Err(Error::InvalidCursor);
    }
    Ok(position)
}

/// Position after which the next page starts. Clients see it only as an opaque string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub worker_id: String,
    pub lab_id: String,
}

/// Cursors longer than this are rejected before decoding (ids are short).
const MAX_ENCODED_LEN: usize = 1024;

impl PageCursor {
    pub fn encode(&self) -> String {
        encode(&serde_json::json!([self.worker_id, self.lab_id]))
    }

    pub fn decode(text: &str) -> Result<Self> {
        let [worker_id, lab_id]: [String; 2] =
            serde_json::from_value(decode(text)?).map_err(|_| Error::InvalidCursor)?;
        if worker_id.is_empty() || lab_id.is_empty() {
            return Err(Error::InvalidCursor);
        }
        Ok(Self { worker_id, lab_id })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn round_trips(w in "[^\u{0}]{1,40}", l in "[^\u{0}]{1,40}") {
            let c = PageCursor { worker_id: w, lab_id: l };
            prop_assert_eq!(PageCursor::decode(&c.encode()).expect("decodes"), c);
        }

        /// Text this API did not issue is refused: whatever decodes is exactly what `encode`
        /// gives for the same position (so no second spelling of a cursor is accepted).
        #[test]
        fn only_issued_cursors_decode(s in "[A-Za-z0-9_-]{0,80}|.{0,80}") {
            if let Ok(c) = PageCursor::decode(&s) {
                prop_assert_eq!(c.encode(), s);
            }
        }

        /// The same position spelt another way (spaces, an escaped letter) was not issued.
        #[test]
        fn other_spellings_of_a_position_are_refused(w in "[a-z]{1,10}", l in "[a-z]{1,10}", style in 0..3u8) {
            let json = match style {
                0 => format!("[\"{w}\", \"{l}\"]"),
                1 => format!(" [\"{w}\",\"{l}\"]"),
                _ => format!("[\"\\u{:04x}{}\",\"{l}\"]", w.as_bytes()[0], &w[1..]),
            };
            let text = URL_SAFE_NO_PAD.encode(json);
            prop_assert!(PageCursor::decode(&text).is_err(), "{}", text);
            let issued = PageCursor { worker_id: w, lab_id: l }.encode();
            prop_assert!(PageCursor::decode(&issued).is_ok());
        }
    }

    #[test]
    fn malformed_cursors_are_invalid() {
        for bad in [
            "",
            "!!!",
            "e30",
            &"A".repeat(2000),
            &URL_SAFE_NO_PAD.encode(b"[\"\",\"x\"]"),
        ] {
            assert!(
                matches!(PageCursor::decode(bad), Err(Error::InvalidCursor)),
                "{bad}"
            );
        }
    }
}
