//! The opaque page cursor of the cross-worker listing: the last (worker_id, lab_id) served.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

use crate::{Error, Result};

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
        let json = serde_json::to_vec(&[&self.worker_id, &self.lab_id]).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    pub fn decode(text: &str) -> Result<Self> {
        if text.len() > MAX_ENCODED_LEN {
            return Err(Error::InvalidCursor);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| Error::InvalidCursor)?;
        let [worker_id, lab_id]: [String; 2] =
            serde_json::from_slice(&bytes).map_err(|_| Error::InvalidCursor)?;
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

        #[test]
        fn garbage_is_rejected_not_a_panic(s in ".{0,80}") {
            let _ = PageCursor::decode(&s);
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
