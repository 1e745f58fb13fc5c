//! Callers you can trust: who a request on the main listener comes from (an API key, or a
//! JWT signed with a configured key), and what that caller may do (grants: a verb on a
//! pattern of services and workflows). Off unless `[auth]` declares keys or a JWT issuer;
//! `api/auth.rs` applies it to every route.

use std::path::PathBuf;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// What a caller may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Start a workflow's run (`POST /v1/workflows/{workflow}/{id}`, signal-with-start).
    Start,
    /// Call or send to a handler (`/v1/call`, `/v1/send`).
    Call,
    Signal,
    Query,
    Update,
    Cancel,
    /// Read an invocation or a run: its status and output, its runs, and, in any answer,
    /// its `idempotency_key` and `last_error`.
    Read,
}

impl Verb {
    pub const ALL: [Verb; 7] = [
        Verb::Start,
        Verb::Call,
        Verb::Signal,
        Verb::Query,
        Verb::Update,
        Verb::Cancel,
        Verb::Read,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Call => "call",
            Verb::Signal => "signal",
            Verb::Query => "query",
            Verb::Update => "update",
            Verb::Cancel => "cancel",
            Verb::Read => "read",
        }
    }

    fn parse(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|verb| verb.as_str() == s)
    }
}

/// One grant: a verb (or every verb) on the targets a pattern matches.
///
/// Written `verb:pattern` (`start:billing`, `signal:order/*`, `read:*`, `*:reports-*`). A
/// pattern without `/` matches a service's or a workflow's name; one with `/` matches
/// `service/handler`. `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    verb: Option<Verb>,
    pattern: String,
}

impl Grant {
    pub fn parse(s: &str) -> Result<Grant, String> {
        let (verb, pattern) = s.split_once(':').ok_or_else(|| {
            format!("grant {s:?} is not verb:pattern (such as \"start:billing\" or \"read:*\")")
        })?;
        let verb = match verb {
            "*" => None,
            verb => Some(Verb::parse(verb).ok_or_else(|| {
                format!(
                    "grant {s:?}: {verb:?} is not a verb (start, call, signal, query, update, cancel, read or *)"
                )
            })?),
        };
        let valid = !pattern.is_empty()
            && pattern.len() <= 257
            && pattern.matches('/').count() <= 1
            && pattern
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.*/".contains(&b));
        if !valid {
            return Err(format!(
                "grant {s:?}: the pattern is a service or workflow name, or service/handler, where * matches anything"
            ));
        }
        Ok(Grant {
            verb,
            pattern: pattern.to_owned(),
        })
    }

    fn allows(&self, verb: Verb, service: &str, handler: &str) -> bool {
        if self.verb.is_some_and(|granted| granted != verb) {
            return false;
        }
        match self.pattern.split_once('/') {
            Some((service_pattern, handler_pattern)) => {
                glob(service_pattern, service) && glob(handler_pattern, handler)
            }
            None => glob(&self.pattern, service),
        }
    }

    /// Whether it grants `verb` on everything (so nothing is hidden from its holder).
    fn everywhere(&self, verb: Verb) -> bool {
        self.verb.is_none_or(|granted| granted == verb)
            && (self.pattern == "*" || self.pattern == "*/*")
    }
}

/// `*` matches any run of characters (also none); everything else itself.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Who a request comes from, and what it may do.
#[derive(Debug, Clone)]
pub enum Access {
    /// Authentication is off: every caller may do everything.
    Open,
    Caller {
        name: String,
        grants: Vec<Grant>,
    },
}

impl Access {
    pub fn allows(&self, verb: Verb, service: &str, handler: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Caller { grants, .. } => grants
                .iter()
                .any(|grant| grant.allows(verb, service, handler)),
        }
    }

    /// Whether the caller may `verb` on every target: then a request for something that
    /// does not exist may be told so.
    pub fn allows_everywhere(&self, verb: Verb) -> bool {
        match self {
            Access::Open => true,
            Access::Caller { grants, .. } => grants.iter().any(|grant| grant.everywhere(verb)),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Access::Open => "",
            Access::Caller { name, .. } => name,
        }
    }
}

/// `[auth]` in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    pub jwt: Option<JwtConfig>,
}

/// An API key: sent as `Authorization: Bearer KEY`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds it (in logs and problems).
    pub name: String,
    /// The key's SHA-256 in hex (`printf %s KEY | sha256sum`), so the config does not
    /// hold the key itself; or `key`.
    pub sha256: Option<String>,
    pub key: Option<Secret>,
    pub grants: Vec<String>,
}

/// JWTs signed by an issuer: HS256 with a shared secret, or RS256/ES256 with a public key
/// (a PEM file) or the keys of a JWKS file (chosen by the token's `kid`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub hs256_secret: Option<Secret>,
    pub rs256_public_key: Option<PathBuf>,
    pub es256_public_key: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    /// When set, a token must name this issuer (`iss`) / audience (`aud`).
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim that holds the grants: a space-separated string or an array of
    /// `verb:pattern` (`scope` by default, as OAuth scopes).
    #[serde(default = "default_grants_claim")]
    pub grants_claim: String,
}

fn default_grants_claim() -> String {
    "scope".into()
}

struct ApiKey {
    digest: [u8; 32],
    name: String,
    grants: Vec<Grant>,
}

struct Jwt {
    /// The keys a token may be checked with: `(kid, key, algorithm)`; a key without a kid
    /// is tried for any token of its algorithm.
    keys: Vec<(
        Option<String>,
        jsonwebtoken::DecodingKey,
        jsonwebtoken::Algorithm,
    )>,
    issuer: Option<String>,
    audience: Option<String>,
    grants_claim: String,
}

/// Why a request was not let in.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("this route needs credentials: Authorization: Bearer with an API key or a JWT")]
    Missing,
    #[error("the credentials were not accepted: {0}")]
    Invalid(String),
}

/// Checks who a request comes from.
pub struct Authenticator {
    keys: Vec<ApiKey>,
    jwt: Option<Jwt>,
}

impl Authenticator {
    /// Off: every caller may do everything.
    pub fn open() -> Authenticator {
        Authenticator {
            keys: Vec::new(),
            jwt: None,
        }
    }

    /// From the config; a key or a grant that cannot work stops Durin at start.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, String> {
        let mut keys = Vec::new();
        for key in &config.api_keys {
            let digest = match (&key.sha256, &key.key) {
                (Some(hex), None) => parse_digest(hex).ok_or_else(|| {
                    format!("api key {:?}: sha256 is not 64 hex digits", key.name)
                })?,
                (None, Some(secret)) if secret.expose().len() >= 16 => {
                    Sha256::digest(secret.expose().as_bytes()).into()
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "api key {:?}: a key is at least 16 characters",
                        key.name
                    ))
                }
                _ => {
                    return Err(format!(
                        "api key {:?}: give sha256 (of the key) or key, one of them",
                        key.name
                    ))
                }
            };
            keys.push(ApiKey {
                digest,
                name: key.name.clone(),
                grants: parse_grants(&key.grants)
                    .map_err(|e| format!("api key {:?}: {e}", key.name))?,
            });
        }
        let jwt = config.jwt.as_ref().map(jwt).transpose()?;
        Ok(Authenticator { keys, jwt })
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.jwt.is_some()
    }

    /// The caller an `Authorization` header names (`Open` when authentication is off).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Access, Refusal> {
        if !self.enabled() {
            return Ok(Access::Open);
        }
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(Refusal::Missing)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every key is compared, each in constant time, so the time says nothing of which
        // (or whether one) matched.
        let mut found = None;
        for key in &self.keys {
            let same = key
                .digest
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if same {
                found = Some(key);
            }
        }
        if let Some(key) = found {
            return Ok(Access::Caller {
                name: key.name.clone(),
                grants: key.grants.clone(),
            });
        }
        match &self.jwt {
            Some(jwt) if token.matches('.').count() == 2 => jwt.check(token),
            _ => Err(Refusal::Invalid("no API key matches".into())),
        }
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

fn parse_grants(grants: &[String]) -> Result<Vec<Grant>, String> {
    grants.iter().map(|grant| Grant::parse(grant)).collect()
}

fn jwt(config: &JwtConfig) -> Result<Jwt, String> {
    use jsonwebtoken::{Algorithm, DecodingKey};
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("jwt: cannot read {}: {e}", path.display()))
    };
    let mut keys = Vec::new();
    if let Some(secret) = &config.hs256_secret {
        if secret.expose().len() < 32 {
            return Err("jwt: hs256_secret must be at least 32 bytes".into());
        }
        let key = DecodingKey::from_secret(secret.expose().as_bytes())
            .map_err(|e| format!("jwt: hs256_secret: {e}"))?;
        keys.push((None, key, Algorithm::HS256));
    }
    if let Some(path) = &config.rs256_public_key {
        let key = DecodingKey::from_rsa_pem(&read(path)?).map_err(|e| {
            format!(
                "jwt: {} is not an RSA public key (PEM): {e}",
                path.display()
            )
        })?;
        keys.push((None, key, Algorithm::RS256));
    }
    if let Some(path) = &config.es256_public_key {
        let key = DecodingKey::from_ec_pem(&read(path)?).map_err(|e| {
            format!(
                "jwt: {} is not an EC P-256 public key (PEM): {e}",
                path.display()
            )
        })?;
        keys.push((None, key, Algorithm::ES256));
    }
    if let Some(path) = &config.jwks_file {
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&read(path)?)
            .map_err(|e| format!("jwt: {} is not a JWKS: {e}", path.display()))?;
        for jwk in &set.keys {
            use jsonwebtoken::jwk::{
                AlgorithmParameters, EllipticCurve, KeyAlgorithm, PublicKeyUse,
            };
            // Only signing keys of the two algorithms Durin checks: an encryption key, a
            // P-384 curve or a key meant for another algorithm is left out.
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|usage| *usage != PublicKeyUse::Signature)
            {
                continue;
            }
            let algorithm = match (&jwk.algorithm, &jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("jwt: a key of {}: {e}", path.display()))?;
            keys.push((jwk.common.key_id.clone(), key, algorithm));
        }
    }
    if keys.is_empty() {
        return Err(
            "jwt: give hs256_secret, rs256_public_key, es256_public_key or jwks_file".into(),
        );
    }
    Ok(Jwt {
        keys,
        issuer: config.issuer.clone(),
        audience: config.audience.clone(),
        grants_claim: config.grants_claim.clone(),
    })
}

impl Jwt {
    fn check(&self, token: &str) -> Result<Access, Refusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Refusal::Invalid(format!("not a JWT: {e}")))?;
        let candidates = self.keys.iter().filter(|(kid, _, algorithm)| {
            *algorithm == header.alg
                && match (kid, &header.kid) {
                    (Some(kid), Some(wanted)) => kid == wanted,
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        });
        let mut last = format!("no configured key checks {:?} tokens", header.alg);
        for (_, key, algorithm) in candidates {
            let mut validation = jsonwebtoken::Validation::new(*algorithm);
            validation.leeway = 30;
            validation.validate_nbf = true;
            // A configured issuer or audience must be named: a token that leaves the
            // claim out is not let through.
            let mut required = vec!["exp"];
            match &self.audience {
                Some(audience) => {
                    validation.set_audience(&[audience]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            if let Some(issuer) = &self.issuer {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => return self.access(&data.claims),
                Err(e) => last = e.to_string(),
            }
        }
        Err(Refusal::Invalid(format!("the JWT was refused: {last}")))
    }

    fn access(&self, claims: &serde_json::Value) -> Result<Access, Refusal> {
        let grants: Vec<String> = match &claims[&self.grants_claim] {
            serde_json::Value::String(scopes) => {
                scopes.split_whitespace().map(str::to_owned).collect()
            }
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        // Scopes that are not grants (`openid`, `profile`) are someone else's: skipped.
        let grants = grants
            .iter()
            .filter(|grant| grant.contains(':'))
            .filter_map(|grant| Grant::parse(grant).ok())
            .collect();
        let name = claims["sub"]
            .as_str()
            .unwrap_or("a JWT without sub")
            .to_owned();
        Ok(Access::Caller { name, grants })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(grants: &[&str]) -> Access {
        Access::Caller {
            name: "t".into(),
            grants: grants.iter().map(|g| Grant::parse(g).unwrap()).collect(),
        }
    }

    #[test]
    fn grants_match_names_and_service_handler_pairs() {
        let caller = access(&["start:billing", "call:order/*", "read:rep*", "*:audit"]);
        assert!(caller.allows(Verb::Start, "billing", "run"));
        assert!(!caller.allows(Verb::Signal, "billing", "run"));
        assert!(!caller.allows(Verb::Start, "billing2", "run"));
        assert!(caller.allows(Verb::Call, "order", "process"));
        assert!(!caller.allows(Verb::Call, "orders", "process"));
        assert!(caller.allows(Verb::Read, "reports", "run"));
        assert!(caller.allows(Verb::Cancel, "audit", "x"));
        assert!(!caller.allows_everywhere(Verb::Read));
        assert!(access(&["read:*"]).allows_everywhere(Verb::Read));
        assert!(Access::Open.allows(Verb::Cancel, "anything", "at-all"));
    }

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxc"));
        assert!(!glob("ab*ba", "aba"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    #[test]
    fn bad_grants_and_keys_are_named() {
        assert!(Grant::parse("start").unwrap_err().contains("verb:pattern"));
        assert!(Grant::parse("launch:x").unwrap_err().contains("not a verb"));
        assert!(Grant::parse("read:a b").unwrap_err().contains("pattern"));
        let config = AuthConfig {
            api_keys: vec![ApiKeyConfig {
                name: "short".into(),
                sha256: None,
                key: Some("tiny".into()),
                grants: vec![],
            }],
            jwt: None,
        };
        assert!(Authenticator::new(&config)
            .err()
            .unwrap()
            .contains("at least 16"));
    }

    #[test]
    fn an_api_key_is_known_by_its_digest() {
        let digest = crate::http::hex(&Sha256::digest(b"0123456789abcdef-key"));
        let config = AuthConfig {
            api_keys: vec![ApiKeyConfig {
                name: "billing".into(),
                sha256: Some(digest),
                key: None,
                grants: vec!["start:billing".into()],
            }],
            jwt: None,
        };
        let auth = Authenticator::new(&config).unwrap();
        let caller = auth
            .authenticate(Some("Bearer 0123456789abcdef-key"))
            .unwrap();
        assert_eq!(caller.name(), "billing");
        assert!(matches!(auth.authenticate(None), Err(Refusal::Missing)));
        assert!(matches!(
            auth.authenticate(Some("Bearer nope")),
            Err(Refusal::Invalid(_))
        ));
    }
}
