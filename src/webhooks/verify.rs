//! The signature schemes of webhook providers: each checks a delivery's headers and body
//! against the source's secrets (two at once while one is rotated), in constant time
//! (`Mac::verify_slice`), and refuses a timestamp outside the tolerance (a replayed
//! delivery).

use axum::http::HeaderMap;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How a source's deliveries are signed.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "scheme", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Scheme {
    /// Standard Webhooks (Svix and others): `webhook-id`, `webhook-timestamp` (seconds),
    /// `webhook-signature` (`v1,<base64>` entries, space-separated) over
    /// `{id}.{timestamp}.{body}`; secrets `whsec_<base64>`.
    StandardWebhooks,
    /// Stripe: `Stripe-Signature: t=<seconds>,v1=<hex>[,v1=…]` over `{t}.{body}`.
    Stripe,
    /// GitHub: `X-Hub-Signature-256: sha256=<hex>` over the body (no timestamp).
    Github,
    /// Slack: `X-Slack-Signature: v0=<hex>` over `v0:{X-Slack-Request-Timestamp}:{body}`.
    Slack,
    /// An HMAC-SHA256 of the body, hex (optionally after `prefix`), in `header`.
    Hmac {
        header: String,
        #[serde(default)]
        prefix: String,
    },
}

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the {0} header is missing")]
    Missing(String),
    #[error("the {0} header is malformed: {1}")]
    Malformed(String, String),
    #[error("the signature does not match any of the source's secrets")]
    Mismatch,
    #[error("the delivery was signed {0} s away from now, more than the tolerance allows")]
    Stale(i64),
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Refused> {
    headers
        .get(name)
        .ok_or_else(|| Refused::Missing(name.to_owned()))?
        .to_str()
        .map_err(|_| Refused::Malformed(name.to_owned(), "not visible ASCII".into()))
}

/// A MAC of `parts` under `key`.
fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes a key of any length.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Whether one of `candidates` (signatures as sent) is the MAC of `parts` under one of
/// `keys`, compared in constant time.
/// Each MAC is computed once per key (never once per candidate: a header full of
/// candidates must not cost a MAC of the body each), and only candidates of a MAC's
/// length, at most [`MAX_CANDIDATES`] of them, are looked at.
fn any_matches(keys: &[Vec<u8>], parts: &[&[u8]], candidates: &[Vec<u8>]) -> bool {
    let candidates: Vec<&Vec<u8>> = candidates
        .iter()
        .filter(|c| c.len() == 32)
        .take(MAX_CANDIDATES)
        .collect();
    if candidates.is_empty() {
        return false;
    }
    keys.iter().any(|key| {
        let mac = mac(key, parts);
        candidates
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    })
}

/// Signatures a delivery may carry at once (one per secret the provider rotates).
const MAX_CANDIDATES: usize = 8;

fn timestamp(name: &str, value: &str) -> Result<i64, Refused> {
    value
        .trim()
        .parse::<i64>()
        .map_err(|_| Refused::Malformed(name.to_owned(), "not a number of seconds".into()))
}

fn fresh(signed_s: i64, now_ms: i64, tolerance_s: i64) -> Result<(), Refused> {
    let off = (now_ms / 1000).saturating_sub(signed_s);
    if off.abs() > tolerance_s {
        return Err(Refused::Stale(off));
    }
    Ok(())
}

fn hex_bytes(name: &str, text: &str) -> Result<Vec<u8>, Refused> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Refused::Malformed(name.to_owned(), "not hex".into()));
    }
    Ok((0..text.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect())
}

impl Scheme {
    /// The keys of `secrets` as this scheme uses them (Standard Webhooks' `whsec_` secrets
    /// are base64; the others' are used as they are).
    pub fn keys(&self, secrets: &[String]) -> Result<Vec<Vec<u8>>, String> {
        secrets
            .iter()
            .map(|secret| {
                if secret.trim().is_empty() {
                    return Err("an empty secret would let anyone sign".to_owned());
                }
                Ok(secret)
            })
            .map(|secret| match (self, secret?) {
                (Scheme::StandardWebhooks, secret) => {
                    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|e| format!("a Standard Webhooks secret is whsec_<base64>: {e}"))
                        .and_then(|key| match key.is_empty() {
                            true => Err("an empty secret would let anyone sign".to_owned()),
                            false => Ok(key),
                        })
                }
                (_, secret) => Ok(secret.as_bytes().to_vec()),
            })
            .collect()
    }

    /// Checks a delivery: its signature under one of `keys`, and, for the schemes that
    /// sign a time, that it was signed within `tolerance_s` of `now_ms`.
    pub fn verify(
        &self,
        keys: &[Vec<u8>],
        headers: &HeaderMap,
        body: &[u8],
        now_ms: i64,
        tolerance_s: i64,
    ) -> Result<(), Refused> {
        match self {
            Scheme::StandardWebhooks => {
                let id = header(headers, "webhook-id")?;
                let sent_at = header(headers, "webhook-timestamp")?;
                let at = timestamp("webhook-timestamp", sent_at)?;
                let signatures: Vec<Vec<u8>> = header(headers, "webhook-signature")?
                    .split_whitespace()
                    .filter_map(|entry| entry.strip_prefix("v1,"))
                    .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
                    .collect();
                if signatures.is_empty() {
                    return Err(Refused::Malformed(
                        "webhook-signature".into(),
                        "no v1,<base64> signature".into(),
                    ));
                }
                let parts = [id.as_bytes(), b".", sent_at.as_bytes(), b".", body];
                if !any_matches(keys, &parts, &signatures) {
                    return Err(Refused::Mismatch);
                }
                fresh(at, now_ms, tolerance_s)
            }
            Scheme::Stripe => {
                let value = header(headers, "stripe-signature")?;
                let mut at = None;
                let mut signatures = Vec::new();
                for part in value.split(',') {
                    match part.trim().split_once('=') {
                        Some(("t", t)) => at = Some(t.to_owned()),
                        Some(("v1", hex)) => signatures.push(hex_bytes("stripe-signature", hex)?),
                        _ => {}
                    }
                }
                let sent_at = at
                    .ok_or_else(|| Refused::Malformed("stripe-signature".into(), "no t=".into()))?;
                if signatures.is_empty() {
                    return Err(Refused::Malformed(
                        "stripe-signature".into(),
                        "no v1=".into(),
                    ));
                }
                let parts = [sent_at.as_bytes(), b".", body];
                if !any_matches(keys, &parts, &signatures) {
                    return Err(Refused::Mismatch);
                }
                fresh(
                    timestamp("stripe-signature", &sent_at)?,
                    now_ms,
                    tolerance_s,
                )
            }
            Scheme::Github => {
                let name = "x-hub-signature-256";
                let value = header(headers, name)?;
                let hex = value
                    .strip_prefix("sha256=")
                    .ok_or_else(|| Refused::Malformed(name.into(), "no sha256=".into()))?;
                if !any_matches(keys, &[body], &[hex_bytes(name, hex)?]) {
                    return Err(Refused::Mismatch);
                }
                Ok(())
            }
            Scheme::Slack => {
                let sent_at = header(headers, "x-slack-request-timestamp")?;
                let at = timestamp("x-slack-request-timestamp", sent_at)?;
                let name = "x-slack-signature";
                let value = header(headers, name)?;
                let hex = value
                    .strip_prefix("v0=")
                    .ok_or_else(|| Refused::Malformed(name.into(), "no v0=".into()))?;
                let parts = [b"v0:".as_slice(), sent_at.as_bytes(), b":", body];
                if !any_matches(keys, &parts, &[hex_bytes(name, hex)?]) {
                    return Err(Refused::Mismatch);
                }
                fresh(at, now_ms, tolerance_s)
            }
            Scheme::Hmac {
                header: name,
                prefix,
            } => {
                let name = name.to_ascii_lowercase();
                let value = header(headers, &name)?;
                let hex = value.strip_prefix(prefix.as_str()).ok_or_else(|| {
                    Refused::Malformed(name.clone(), format!("it does not start with {prefix:?}"))
                })?;
                if !any_matches(keys, &[body], &[hex_bytes(&name, hex)?]) {
                    return Err(Refused::Mismatch);
                }
                Ok(())
            }
        }
    }
}

/// Signatures as each provider makes them, for tests and for the documentation's examples.
pub mod sign {
    use super::*;
    use crate::http::hex;

    /// `webhook-signature` of Standard Webhooks for `secret` (`whsec_…`).
    pub fn standard_webhooks(secret: &str, id: &str, at_s: i64, body: &[u8]) -> String {
        let key = Scheme::StandardWebhooks
            .keys(&[secret.to_owned()])
            .unwrap_or_default()
            .pop()
            .unwrap_or_default();
        let at = at_s.to_string();
        let tag = mac(&key, &[id.as_bytes(), b".", at.as_bytes(), b".", body]).finalize();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag.into_bytes())
        )
    }

    /// `Stripe-Signature` for `secret`.
    pub fn stripe(secret: &str, at_s: i64, body: &[u8]) -> String {
        let at = at_s.to_string();
        let tag = mac(secret.as_bytes(), &[at.as_bytes(), b".", body]).finalize();
        format!("t={at},v1={}", hex(&tag.into_bytes()))
    }

    /// `X-Hub-Signature-256` for `secret`.
    pub fn github(secret: &str, body: &[u8]) -> String {
        let tag = mac(secret.as_bytes(), &[body]).finalize();
        format!("sha256={}", hex(&tag.into_bytes()))
    }

    /// `X-Slack-Signature` for `secret`.
    pub fn slack(secret: &str, at_s: i64, body: &[u8]) -> String {
        let at = at_s.to_string();
        let tag = mac(secret.as_bytes(), &[b"v0:", at.as_bytes(), b":", body]).finalize();
        format!("v0={}", hex(&tag.into_bytes()))
    }

    /// A hex HMAC-SHA256 of the body after `prefix`.
    pub fn hmac_hex(secret: &str, prefix: &str, body: &[u8]) -> String {
        let tag = mac(secret.as_bytes(), &[body]).finalize();
        format!("{prefix}{}", hex(&tag.into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const NOW_MS: i64 = 1_764_438_000_000;
    const NOW_S: i64 = NOW_MS / 1000;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(
                *name,
                HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")),
            );
        }
        headers
    }

    /// Each scheme takes its provider's signature under the old secret or the new one,
    /// and refuses another secret, a changed body and a stale timestamp.
    #[test]
    fn every_scheme_takes_its_providers_signature_and_nothing_else() {
        let body = br#"{"id":"evt_1","type":"invoice.paid"}"#;
        let changed = br#"{"id":"evt_1","type":"invoice.void"}"#;
        let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        // The scheme, its secrets, and the headers its provider sends for a time.
        type Signed = Box<dyn Fn(&str, i64) -> HeaderMap>;
        let cases: Vec<(Scheme, Vec<String>, Signed)> = vec![
            (
                Scheme::StandardWebhooks,
                vec!["whsec_b2xk".into(), whsec.into()],
                Box::new(move |_secret, at| {
                    headers(&[
                        ("webhook-id", "msg_1".into()),
                        ("webhook-timestamp", at.to_string()),
                        (
                            "webhook-signature",
                            sign::standard_webhooks(whsec, "msg_1", at, body),
                        ),
                    ])
                }),
            ),
            (
                Scheme::Stripe,
                vec!["old".into(), "whsec_stripe".into()],
                Box::new(move |_, at| {
                    headers(&[("stripe-signature", sign::stripe("whsec_stripe", at, body))])
                }),
            ),
            (
                Scheme::Github,
                vec!["old".into(), "gh".into()],
                Box::new(move |_, _| headers(&[("x-hub-signature-256", sign::github("gh", body))])),
            ),
            (
                Scheme::Slack,
                vec!["old".into(), "sl".into()],
                Box::new(move |_, at| {
                    headers(&[
                        ("x-slack-request-timestamp", at.to_string()),
                        ("x-slack-signature", sign::slack("sl", at, body)),
                    ])
                }),
            ),
            (
                Scheme::Hmac {
                    header: "X-Signature".into(),
                    prefix: "sha256=".into(),
                },
                vec!["old".into(), "hm".into()],
                Box::new(move |_, _| {
                    headers(&[("x-signature", sign::hmac_hex("hm", "sha256=", body))])
                }),
            ),
        ];
        for (scheme, secrets, signed) in cases {
            let keys = scheme.keys(&secrets).unwrap();
            let good = signed("", NOW_S);
            assert_eq!(
                scheme.verify(&keys, &good, body, NOW_MS, 300),
                Ok(()),
                "{scheme:?}"
            );
            // Rotation: the new secret alone, or the old one alone.
            assert!(
                scheme.verify(&keys[1..], &good, body, NOW_MS, 300).is_ok(),
                "{scheme:?}"
            );
            assert_eq!(
                scheme.verify(&keys[..1], &good, body, NOW_MS, 300),
                Err(Refused::Mismatch),
                "{scheme:?}"
            );
            assert_eq!(
                scheme.verify(&keys, &good, changed, NOW_MS, 300),
                Err(Refused::Mismatch),
                "{scheme:?}"
            );
            let stale = signed("", NOW_S - 600);
            let timed = !matches!(scheme, Scheme::Github | Scheme::Hmac { .. });
            assert_eq!(
                scheme.verify(&keys, &stale, body, NOW_MS, 300).is_err(),
                timed,
                "{scheme:?}: a delivery signed ten minutes ago"
            );
            assert!(matches!(
                scheme.verify(&keys, &HeaderMap::new(), body, NOW_MS, 300),
                Err(Refused::Missing(_))
            ));
        }
    }

    #[test]
    fn malformed_signatures_are_refused_without_a_panic() {
        let keys = Scheme::Stripe.keys(&["s".into()]).unwrap();
        for value in ["", "t=", "t=1,v1=zz", "v1=abc", "t=x,v1=00", "t=1,v1=0"] {
            let sent = headers(&[("stripe-signature", value.to_owned())]);
            assert!(
                Scheme::Stripe
                    .verify(&keys, &sent, b"{}", NOW_MS, 300)
                    .is_err(),
                "{value}"
            );
        }
        assert!(Scheme::StandardWebhooks
            .keys(&["whsec_%%%".into()])
            .is_err());
    }
}
