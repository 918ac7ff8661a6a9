//! JWT-shaped bearer tokens (HS256) as CML issues them: `iss` com.cisco.virl, `iat`, `exp`, `sub`.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
    pub sub: String,
    /// The simulated server that issued the token; another server rejects it.
    pub wid: String,
    /// The server's token epoch at issue time; "expire tokens now" bumps the epoch.
    pub epoch: u64,
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length")
}

pub fn issue(secret: &[u8], claims: &Claims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signing_input = format!("{header}.{payload}");
    let mut m = mac(secret);
    m.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// The claims of a token whose signature is valid; expiry is the caller's business.
pub fn verify(secret: &[u8], token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (header, payload, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let mut m = mac(secret);
    m.update(header.as_bytes());
    m.update(b".");
    m.update(payload.as_bytes());
    m.verify_slice(&URL_SAFE_NO_PAD.decode(sig).ok()?).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_tampered_ones_do_not() {
        let c = Claims {
            iss: "com.cisco.virl".into(),
            iat: 1,
            exp: 2,
            sub: "u".into(),
            wid: "w".into(),
            epoch: 0,
        };
        let t = issue(b"k", &c);
        assert_eq!(t.split('.').count(), 3);
        assert_eq!(verify(b"k", &t), Some(c));
        assert_eq!(verify(b"other", &t), None);
        assert_eq!(verify(b"k", &t.replace('.', "x")), None);
    }
}
