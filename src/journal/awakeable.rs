//! `awakeable`: a wait that something outside completes, with a token.
//!
//! A token carries its own address (the invocation and the journal index of the
//! awakeable) and a MAC of that address under a secret key of this gateway, so resolving
//! needs no lookup table and a token cannot be made from an invocation id. The key is
//! kept in the store (made at first start); tokens are computed when handed out and
//! never written into the journal.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::InvocationId;

const PREFIX: &str = "awk_";
/// Bytes of the MAC kept in a token (128 bits).
const MAC_BYTES: usize = 16;

/// The key that signs tokens.
#[derive(Clone)]
pub struct AwakeableKey(Vec<u8>);

impl AwakeableKey {
    pub fn new(secret: Vec<u8>) -> AwakeableKey {
        AwakeableKey(secret)
    }

    fn mac(&self, id: &InvocationId, index: u32) -> Hmac<Sha256> {
        // A key of any length is accepted by HMAC.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(id.as_str().as_bytes());
        mac.update(&index.to_be_bytes());
        mac
    }

    /// The token of the awakeable at journal `index` of invocation `id`.
    pub fn token(&self, id: &InvocationId, index: u32) -> String {
        let tag = self.mac(id, index).finalize().into_bytes();
        let hex_id = id.as_str().trim_start_matches("inv_");
        format!(
            "{PREFIX}{hex_id}{index:08x}{}",
            crate::http::hex(&tag[..MAC_BYTES])
        )
    }

    /// The address a token names, if the token is well formed and was made by this key.
    pub fn verify(&self, token: &str) -> Result<(InvocationId, u32), String> {
        let malformed =
            || format!("{token:?} is not an awakeable token (awk_ followed by 72 hex digits)");
        let hex = token.strip_prefix(PREFIX).ok_or_else(malformed)?;
        if hex.len() != 32 + 8 + 2 * MAC_BYTES || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let id = InvocationId::parse(&format!("inv_{}", &hex[..32])).map_err(|_| malformed())?;
        let index = u32::from_str_radix(&hex[32..40], 16).map_err(|_| malformed())?;
        let tag: Vec<u8> = (0..MAC_BYTES)
            .map(|i| u8::from_str_radix(&hex[40 + 2 * i..42 + 2 * i], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| malformed())?;
        self.mac(&id, index)
            .verify_truncated_left(&tag)
            .map_err(|_| "the awakeable token was not issued by this gateway".to_owned())?;
        Ok((id, index))
    }
}

impl dyn crate::store::Store {
    /// Resolves (`Ok`) or rejects (`Err`) the awakeable at entry `index` of `id`, once:
    /// timers due by now fire first, and a suspended invocation waiting for it becomes due.
    pub async fn resolve_awakeable(
        &self,
        id: &InvocationId,
        index: u32,
        result: Result<Vec<u8>, durin_protocol::Failure>,
        now_ms: i64,
    ) -> crate::store::StoreResult<crate::store::Resolved> {
        let id = id.to_string();
        self.write(&id.clone(), move |tx| {
            Box::pin(async move { resolve(tx, &id, index, result, now_ms).await })
        })
        .await
    }
}

async fn resolve(
    tx: &mut dyn crate::store::tables::Tx,
    id: &str,
    index: u32,
    result: Result<Vec<u8>, durin_protocol::Failure>,
    now_ms: i64,
) -> crate::store::StoreResult<crate::store::Resolved> {
    use crate::store::{Resolved, StoreError};
    let record = tx
        .lock_invocation(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    let entry = tx
        .entry(id, index)
        .await?
        .filter(|e| e.kind == durin_protocol::EntryKind::Awakeable)
        .ok_or_else(|| StoreError::NotFound(format!("{id} awakeable {index}")))?;
    if let Some(completion) = entry.completion {
        return Ok(Resolved {
            completion,
            first: false,
            woke: false,
        });
    }
    if record.status.is_final() {
        return Err(StoreError::Ended {
            invocation_id: id.to_owned(),
            status: record.status,
        });
    }
    let (value, failure) = match result {
        Ok(value) => (Some(value), None),
        Err(failure) => (None, Some(failure)),
    };
    let bytes = value.as_ref().map_or(0, Vec::len) as i64;
    // Timers that were due before this callback came first.
    super::sleep::fire_timers(tx, id, now_ms, now_ms).await?;
    let completion = super::completion::complete(tx, id, index, value, failure, now_ms).await?;
    if bytes > 0 {
        tx.add_bytes(id, bytes).await?;
    }
    let woke = super::completion::wake_if_waiting(tx, id, index, now_ms).await?;
    Ok(Resolved {
        completion,
        first: true,
        woke,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_forgeries_fail() {
        let key = AwakeableKey::new(b"k".repeat(32));
        let id = InvocationId::generate();
        let token = key.token(&id, 7);
        assert_eq!(key.verify(&token), Ok((id.clone(), 7)));
        // Another index with the same MAC, another key, garbage.
        let forged = token.replace(&format!("{:08x}", 7), &format!("{:08x}", 8));
        assert!(key.verify(&forged).is_err());
        assert!(AwakeableKey::new(b"other".to_vec()).verify(&token).is_err());
        assert!(key.verify("awk_zz").is_err());
        assert!(key.verify(&format!("{id}")).is_err());
    }
}
