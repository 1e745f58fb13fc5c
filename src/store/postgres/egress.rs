//! The egress's occurrences on a database that several nodes share (table
//! `egress_occurrences`, migration 0003).
//!
//! One attempt's calls may reach several nodes' egresses (a handler behind a load
//! balancer), so the count of each call identity in the attempt, which picks the call's
//! occurrence and so its derived `Idempotency-Key`, is kept here rather than in a node's
//! memory: two identical calls never share an occurrence, and a call given back (it left
//! nothing in the journal) is taken again by its retry, through whichever node. The SQLite
//! store keeps no such table: its one node counts in memory (`EgressCalls`).
//!
//! Rows of an attempt go when a later attempt of the invocation takes an occurrence (in
//! the same statement) and with the invocation when it is purged (`delete_invocation`).

use std::collections::HashMap;

use sqlx::PgConnection;

use super::rows::{get, get_u32, refusal};
use super::*;

/// Takes the next occurrence of identity `$3` in attempt `$2` of invocation `$1`, fenced
/// by the attempt (no row when it is not the running one), and deletes the rows of the
/// invocation's earlier attempts.
const TAKE: &str = "WITH running AS ( \
         SELECT 1 FROM invocations WHERE id = $1 AND attempt = $2 AND status = 'running' \
     ), earlier AS ( \
         DELETE FROM egress_occurrences WHERE invocation_id = $1 AND attempt < $2 \
     ) \
     INSERT INTO egress_occurrences (invocation_id, attempt, identity, next) \
     SELECT $1, $2, $3, 1 FROM running \
     ON CONFLICT (invocation_id, attempt, identity) \
     DO UPDATE SET next = egress_occurrences.next + 1 \
     RETURNING next - 1";

/// The occurrence a call of `identity` in `attempt` takes; `Fenced` (or `NotFound`) when
/// the attempt is not the running one.
pub(super) async fn take_occurrence(
    conn: &mut PgConnection,
    id: &str,
    attempt: u32,
    identity: &str,
) -> StoreResult<u32> {
    let row = sqlx::query(TAKE)
        .bind(id)
        .bind(i64::from(attempt))
        .bind(identity)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    match row {
        Some(row) => get_u32(&row, 0),
        None => Err(refusal(conn, id, attempt).await),
    }
}

/// Gives `occurrence` back when it is still the latest of its identity in the attempt (as
/// `EgressCalls::release` does in memory); otherwise it stays used.
pub(super) async fn give_back_occurrence(
    conn: &mut PgConnection,
    id: &str,
    attempt: u32,
    identity: &str,
    occurrence: u32,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE egress_occurrences SET next = next - 1 \
         WHERE invocation_id = $1 AND attempt = $2 AND identity = $3 AND next = $4",
    )
    .bind(id)
    .bind(i64::from(attempt))
    .bind(identity)
    .bind(i64::from(occurrence) + 1)
    .execute(conn)
    .await
    .map_err(backend)?;
    Ok(())
}

/// How many calls of each identity the attempt has made (occurrences taken and not given
/// back).
pub(super) async fn occurrences_seen(
    conn: &mut PgConnection,
    id: &str,
    attempt: u32,
) -> StoreResult<HashMap<String, u32>> {
    let rows = sqlx::query(
        "SELECT identity, next FROM egress_occurrences WHERE invocation_id = $1 AND attempt = $2",
    )
    .bind(id)
    .bind(i64::from(attempt))
    .fetch_all(conn)
    .await
    .map_err(backend)?;
    rows.iter()
        .map(|row| Ok((get::<String>(row, 0)?, get_u32(row, 1)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use durin_protocol::{HandlerSpec, ServiceSpec};

    use super::*;

    const T0: i64 = 1_700_000_000_000;

    /// A store on a schema of its own, with a running invocation (attempt 1); returns the
    /// schema's name too, to drop it.
    async fn store_with_running() -> (PostgresStore, InvocationRecord, String, String) {
        let server = std::env::var("DURIN_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&server).await.unwrap();
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = format!("{server}?options=-c%20search_path%3D{schema}");
        let store = PostgresStore::open(&url, NodeOptions::default())
            .await
            .unwrap();
        let spec = HandlerSpec {
            name: "run".into(),
            path: None,
            retry_policy: None,
            start_to_close: None,
            schedule_to_close: None,
            schedule_to_start: None,
            heartbeat_timeout: None,
            key: None,
        };
        store
            .register_deployment(NewDeployment {
                url: "http://127.0.0.1:1".into(),
                protocol: HandlerProtocol::Sdk { version: 2 },
                services: vec![ServiceSpec {
                    name: "svc".into(),
                    kind: Default::default(),
                    handlers: vec![spec],
                }],
                now_ms: T0,
                active: true,
            })
            .await
            .unwrap();
        let target = store.latest_handler("svc", "run").await.unwrap().unwrap();
        let created = (&store as &dyn Store)
            .create_invocation(NewInvocation {
                id: InvocationId::generate(),
                target,
                input: b"{}".to_vec(),
                content_type: None,
                idempotency: None,
                now_ms: T0,
                deadline_ms: None,
                traceparent: None,
                run_now: true,
                key: None,
            })
            .await
            .unwrap();
        let Created::New { record, .. } = created else {
            panic!("{created:?}")
        };
        (store, record, schema, server)
    }

    async fn rows(store: &PostgresStore, id: &InvocationId) -> Vec<(i64, String, i64)> {
        sqlx::query_as(
            "SELECT attempt, identity, next FROM egress_occurrences WHERE invocation_id = $1 \
             ORDER BY attempt, identity",
        )
        .bind(id.as_str())
        .fetch_all(&store.pool)
        .await
        .unwrap()
    }

    /// Occurrences count per attempt and identity; only the latest can be given back; a
    /// stale attempt is fenced; a later attempt's first take deletes the earlier attempt's
    /// rows, and a purge deletes the rest.
    #[tokio::test]
    async fn occurrences_are_taken_given_back_and_deleted_with_their_attempt() {
        if !crate::store::tests::postgres_or_skip(
            "occurrences_are_taken_given_back_and_deleted_with_their_attempt",
        )
        .await
        {
            return;
        }
        let (store, record, schema, server) = store_with_running().await;
        let id = &record.id;
        assert_eq!(store.take_occurrence(id, 1, "a").await.unwrap(), Some(0));
        assert_eq!(store.take_occurrence(id, 1, "a").await.unwrap(), Some(1));
        assert_eq!(store.take_occurrence(id, 1, "b").await.unwrap(), Some(0));
        // Occurrence 0 of `a` is not the latest: it stays used.
        store.give_back_occurrence(id, 1, "a", 0).await.unwrap();
        assert_eq!(
            store.occurrences_seen(id, 1).await.unwrap(),
            HashMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)])
        );
        // The latest is taken again by the next call of its identity.
        store.give_back_occurrence(id, 1, "a", 1).await.unwrap();
        assert_eq!(store.take_occurrence(id, 1, "a").await.unwrap(), Some(1));
        // An attempt that is not the running one takes nothing.
        let refused = store.take_occurrence(id, 2, "a").await.unwrap_err();
        assert!(
            matches!(refused, StoreError::Fenced { attempt: 2, .. }),
            "{refused}"
        );

        // Attempt 2: its first take starts from 0 and deletes attempt 1's rows.
        let back_off = AttemptEnd::BackOff {
            until_ms: T0,
            error: "retry".into(),
            charged: Charge::Nobody,
        };
        (&store as &dyn Store)
            .end_attempt(id, 1, back_off, T0)
            .await
            .unwrap();
        let claimed = (&store as &dyn Store).claim_due(T0 + 1, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(store.take_occurrence(id, 2, "a").await.unwrap(), Some(0));
        assert_eq!(rows(&store, id).await, [(2, "a".to_owned(), 1)]);
        assert!(store.take_occurrence(id, 1, "a").await.is_err());

        // Ended and purged: nothing is left.
        let end = AttemptEnd::Completed {
            output: b"{}".to_vec(),
            content_type: None,
        };
        (&store as &dyn Store)
            .end_attempt(id, 2, end, T0 + 2)
            .await
            .unwrap();
        assert!((&store as &dyn Store).purge(id).await.unwrap());
        assert!(rows(&store, id).await.is_empty());

        drop(store);
        let admin = sqlx::PgPool::connect(&server).await.unwrap();
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    }
}
