//! Identifiers and names checked once at the boundary (parse, don't validate).

use std::fmt;

/// `inv_` followed by a UUIDv7 in simple hex form: unique and sortable by creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InvocationId(String);

impl InvocationId {
    pub fn generate() -> InvocationId {
        InvocationId(format!("inv_{}", uuid::Uuid::now_v7().simple()))
    }

    pub fn parse(s: &str) -> Result<InvocationId, String> {
        let hex = s
            .strip_prefix("inv_")
            .ok_or_else(|| format!("invocation id {s:?} does not start with \"inv_\""))?;
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "invocation id {s:?} is not \"inv_\" followed by 32 hex digits"
            ));
        }
        Ok(InvocationId(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InvocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `dp_` followed by a UUIDv7.
pub fn new_deployment_id() -> String {
    format!("dp_{}", uuid::Uuid::now_v7().simple())
}

/// A service or handler name: 1 to 128 characters of `[A-Za-z0-9_.-]`, starting with a letter.
pub fn parse_name(what: &str, s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{what} name {s:?} is invalid: use 1 to 128 letters, digits, '_', '-' or '.', starting with a letter"
        ))
    }
}

/// The value of an `Idempotency-Key` header: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<IdempotencyKey, String> {
        if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "Idempotency-Key must be 1 to 255 visible ASCII characters (no spaces)".into(),
            );
        }
        Ok(IdempotencyKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A workflow id: 1 to 255 visible ASCII characters, no `/`.
pub fn parse_workflow_id(id: &str) -> Result<String, String> {
    if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(format!(
            "workflow id {id:?} is invalid: use 1 to 255 visible ASCII characters other than '/'"
        ));
    }
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_ids_round_trip_and_reject_garbage() {
        let id = InvocationId::generate();
        assert_eq!(InvocationId::parse(id.as_str()).unwrap(), id);
        assert!(InvocationId::parse("inv_123").is_err());
        assert!(InvocationId::parse("xyz_0193a2b4c5d6e7f8091a2b3c4d5e6f70").is_err());
        assert!(InvocationId::parse("inv_0193a2b4c5d6e7f8091a2b3c4d5e6fzz").is_err());
    }

    #[test]
    fn names_and_keys() {
        assert!(parse_name("service", "order").is_ok());
        assert!(parse_name("service", "9lives").is_err());
        assert!(parse_name("handler", "a/b").is_err());
        assert!(IdempotencyKey::parse("order-42").is_ok());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }
}
