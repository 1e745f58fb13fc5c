//! Durin's signature on every request it sends to a handler, so that a deployment can
//! refuse a forged invocation (a forged journal, a `context_url` pointing elsewhere).
//!
//! The key is an Ed25519 key of this gateway, made at first start and kept in the store;
//! its public half is printed at start and served on the admin API. The signature covers
//! [`durin_protocol::signed_message`] (version 3: the path, every `Durin-*` header sent,
//! the attempt token, `Durin-Cancelled` and `Durin-Workflow-Id` included, and the body)
//! and travels in
//! `Durin-Signature`. This module imports nothing of the gateway.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use durin_protocol::SIGNATURE_VERSION;
use ed25519_dalek::{Signer, SigningKey};

pub struct RequestSigner {
    key: SigningKey,
}

impl RequestSigner {
    /// The signer whose secret key is `seed` (32 bytes from the store).
    pub fn new(seed: &[u8]) -> Result<RequestSigner, String> {
        let seed: [u8; 32] = seed
            .get(..32)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| "the signing key needs 32 bytes".to_owned())?;
        Ok(RequestSigner {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The `Durin-Signature` value of a request (`t=…,v3=…`): it covers the path, every
    /// `Durin-*` header the request carries (`headers`, names in lower case) and the body.
    pub fn header(
        &self,
        timestamp_ms: i64,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> String {
        let message = durin_protocol::signed_message(timestamp_ms, path, headers, body);
        let signature = self.key.sign(&message);
        format!(
            "t={timestamp_ms},{SIGNATURE_VERSION}={}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }

    /// The public key, standard base64 of its 32 bytes.
    pub fn public_key(&self) -> String {
        STANDARD.encode(self.key.verifying_key().to_bytes())
    }

    /// The public key as a JSON Web Key (what Node's `crypto.createPublicKey` takes).
    pub fn public_jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(self.key.verifying_key().to_bytes()),
        })
    }
}
