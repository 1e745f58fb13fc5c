//! The journal entry of an outbound call: what was sent and what came back.

use super::*;

/// The value of an egress journal entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct EgressRecord {
    pub(super) method: String,
    pub(super) url: String,
    pub(super) body_digest: String,
    pub(super) occurrence: u32,
    pub(super) idempotency_key: String,
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) body_base64: Option<String>,
}

impl EgressRecord {
    /// A response that is passed on but not journaled.
    pub(super) fn unjournaled(
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> EgressRecord {
        EgressRecord {
            method: String::new(),
            url: String::new(),
            body_digest: String::new(),
            occurrence: 0,
            idempotency_key: String::new(),
            status,
            headers,
            body_base64: Some(base64::engine::general_purpose::STANDARD.encode(body)),
            body: None,
        }
    }

    fn body_bytes(&self) -> Vec<u8> {
        match (&self.body, &self.body_base64) {
            (Some(text), _) => text.clone().into_bytes(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    pub(super) fn response(&self, replayed: bool) -> Response {
        let mut response = Response::new(Body::from(self.body_bytes()));
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
        if replayed {
            headers.insert(HEADER_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}
