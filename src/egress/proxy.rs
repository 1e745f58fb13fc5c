//! The proxy: a call answered from the journal, refused as a divergence, or sent with its
//! idempotency key and recorded before the handler sees its response.

use super::*;

/// Headers that describe one hop, not the message; never forwarded.
pub(super) fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    ) || name.starts_with("durin-")
}

impl Egress {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        engine: Arc<Engine>,
        calls: Arc<EgressCalls>,
        replays: Arc<crate::replay::Replays>,
        config: EgressConfig,
    ) -> Result<Egress, reqwest::Error> {
        // No proxy from the environment: the address check is made on what the egress
        // itself connects to.
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                named: named_hosts(&config.allow),
            }));
        for root in &config.extra_roots {
            http = http.add_root_certificate(root.clone());
        }
        Ok(Egress {
            store,
            clock,
            engine,
            calls,
            replays,
            http: http.build()?,
            config,
        })
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(handle).with_state(self)
    }

    /// Whether the allow-list lets handlers call `url`'s host. An internal address written
    /// as an IP literal must be named; a name is checked again, on the addresses it
    /// resolves to, when the call connects ([`GuardedResolver`]).
    fn allowed(&self, url: &reqwest::Url) -> bool {
        allowed_by(&self.config.allow, url)
    }

    async fn serve(&self, request: Request) -> Result<Response, ApiError> {
        let (parts, body) = request.into_parts();
        if parts.method == Method::CONNECT {
            return Err(ApiError::BadRequest(
                "the egress does not tunnel (CONNECT): send HTTPS calls in the explicit form http://EGRESS/https/HOST/PATH so that Durin can journal them".into(),
            ));
        }
        let url = target_url(&parts.uri)?;
        let id = parts
            .headers
            .get(HEADER_INVOCATION_ID)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Forbidden(
                    "the egress only carries calls of running invocations: send the Durin-Invocation-Id header your handler was given".into(),
                )
            })
            .and_then(|v| InvocationId::parse(v).map_err(ApiError::BadRequest))?;
        let claimed_attempt = match parts.headers.get(HEADER_ATTEMPT) {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest("the Durin-Attempt header must be a number".into())
                    })?,
            ),
            None => None,
        };
        let limit = self.config.max_body_bytes;
        let body = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::PayloadTooLarge { limit })?;
        let token = parts
            .headers
            .get(HEADER_ATTEMPT_TOKEN)
            .and_then(|v| v.to_str().ok());
        // A replay sends nothing: its calls are answered from its recording, whatever
        // this egress may reach.
        if let Some(session) = token.and_then(|token| self.replays.find(&id, token)) {
            return replayed_call(&session, parts.method.as_str(), url.as_str(), &body);
        }
        if !self.allowed(&url) {
            return Err(ApiError::Forbidden(format!(
                "{} is not in the egress allow-list",
                url.host_str().unwrap_or_default()
            )));
        }
        let token = token
            .ok_or_else(|| {
                ApiError::Forbidden(
                    "the egress only carries calls of a running attempt: send the Durin-Attempt-Token header your handler was given".into(),
                )
            })?
            .to_owned();
        let attempt = match claimed_attempt.filter(|a| self.calls.is_current(&id, *a, &token)) {
            // An earlier call of this attempt was checked, and the attempt has not ended.
            Some(attempt) => attempt,
            None => {
                let (attempt, trace) = self.running_attempt(&id, claimed_attempt, &token).await?;
                if !self.calls.admit(&id, attempt, &token, trace) {
                    return Err(stale(&id, attempt));
                }
                attempt
            }
        };
        let method = parts.method.as_str().to_owned();
        let url_text = url.to_string();
        let body_digest = hex(&Sha256::digest(&body));
        let identity = (method.clone(), url_text.clone(), body_digest.clone());
        // On a store that other nodes share, the attempt's calls may reach their egresses
        // too (a handler behind a load balancer): the occurrence is counted in the store.
        let shared = if self.store.shared() {
            let digest = identity_digest(&method, &url_text, &body_digest);
            self.store
                .take_occurrence(&id, attempt, &digest)
                .await?
                .map(|occurrence| (occurrence, digest))
        } else {
            None
        };
        let (occurrence, shared) = match shared {
            Some((occurrence, digest)) => (occurrence, Some((Arc::clone(&self.store), digest))),
            None => (
                self.calls
                    .with(&id, attempt, |calls| {
                        let n = calls.occurrences.entry(identity.clone()).or_default();
                        let occurrence = *n;
                        *n += 1;
                        occurrence
                    })
                    .ok_or_else(|| stale(&id, attempt))?,
                None,
            ),
        };
        // Gives the occurrence back unless the call ends up in the journal, also when the
        // handler hangs up mid-call (this future is then dropped): its retry has the same
        // identity and Idempotency-Key, so a downstream that honours the key applies it once.
        let mut occurrence_held = OccurrenceHeld {
            calls: &self.calls,
            id: &id,
            attempt,
            identity: &identity,
            occurrence,
            journaled: false,
            shared,
        };
        // The call's span hangs under the attempt's (or under the span the handler sent).
        let span = self
            .calls
            .with(&id, attempt, |calls| calls.trace)
            .flatten()
            .and_then(|trace| {
                let sent = parts.headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
                self.engine
                    .traces()
                    .egress(&trace, &id, attempt, sent, &method, &url_text)
            });
        let traceparent = span.as_ref().map(|span| span.traceparent.as_str());
        let result = self
            .call(
                &id,
                attempt,
                &parts,
                url,
                body,
                &identity,
                occurrence,
                traceparent,
            )
            .await;
        occurrence_held.journaled = matches!(result, Ok((_, true)));
        if !occurrence_held.journaled {
            occurrence_held.give_back_to_store().await;
        }
        if let Some(span) = span {
            match &result {
                Ok((response, _)) => span.end(Some(response.status().as_u16()), outcome(response)),
                Err(_) => span.end(None, "failed"),
            }
        }
        result.map(|(response, _)| response)
    }

    /// Answers one call from the journal, or makes it and journals it. The flag says whether
    /// the call is now in the journal (and so has used its occurrence).
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        id: &InvocationId,
        attempt: u32,
        parts: &axum::http::request::Parts,
        url: reqwest::Url,
        body: bytes::Bytes,
        identity: &(String, String, String),
        occurrence: u32,
        traceparent: Option<&str>,
    ) -> Result<(Response, bool), ApiError> {
        let (method, url_text, body_digest) = identity.clone();
        let id = id.clone();

        let cached = self
            .calls
            .with(&id, attempt, |calls| calls.recorded.clone())
            .ok_or_else(|| stale(&id, attempt))?;
        let recorded = match cached {
            Some(recorded) => recorded,
            None => {
                let loaded = Arc::new(recorded_calls(&self.store.read_journal(&id).await?));
                self.calls
                    .with(&id, attempt, |calls| {
                        Arc::clone(calls.recorded.get_or_insert(loaded))
                    })
                    .ok_or_else(|| stale(&id, attempt))?
            }
        };
        let exact = recorded.iter().find(|(_, r)| {
            r.method == method
                && r.url == url_text
                && r.body_digest == body_digest
                && r.occurrence == occurrence
        });
        if let Some((_, record)) = exact {
            return Ok((record.response(true), true));
        }
        // A recorded call with this method and URL but another body that this attempt has
        // not made yet is where the handler diverged. One with this very body is not: the
        // occurrences of identical calls need not be recorded without gaps (one of two
        // identical calls at once may have failed while the other was journaled), and this
        // call, not recorded, is simply made.
        let diverged = if self.store.shared() {
            // The attempt's calls are counted in the store, whichever node they reached;
            // read only when a recorded call has this method and URL.
            let same_target: Vec<&(u32, EgressRecord)> = recorded
                .iter()
                .filter(|(_, r)| {
                    r.method == method && r.url == url_text && r.body_digest != body_digest
                })
                .collect();
            if same_target.is_empty() {
                None
            } else {
                let seen = self.store.occurrences_seen(&id, attempt).await?;
                same_target
                    .into_iter()
                    .find(|(_, r)| {
                        let digest = identity_digest(&r.method, &r.url, &r.body_digest);
                        seen.get(&digest).copied().unwrap_or(0) <= r.occurrence
                    })
                    .cloned()
            }
        } else {
            self.calls
                .with(&id, attempt, |calls| {
                    recorded
                        .iter()
                        .find(|(_, r)| {
                            let seen = calls
                                .occurrences
                                .get(&(r.method.clone(), r.url.clone(), r.body_digest.clone()))
                                .copied()
                                .unwrap_or(0);
                            r.method == method
                                && r.url == url_text
                                && r.body_digest != body_digest
                                && seen <= r.occurrence
                        })
                        .cloned()
                })
                .ok_or_else(|| stale(&id, attempt))?
        };
        if let Some((index, other)) = diverged {
            return Err(self
                .pause(
                    &id,
                    attempt,
                    format!(
                        "non-determinism at journal index {index}: the journal recorded egress {} {} (body digest {}, occurrence {}) but the handler called {method} {url_text} (body digest {}, occurrence {occurrence}); fix the handler and resume the invocation",
                        other.method,
                        other.url,
                        &other.body_digest[..12],
                        other.occurrence,
                        &body_digest[..12],
                    ),
                )
                .await);
        }

        let idempotency_key = parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let mut hasher = Sha256::new();
                for part in [id.as_str(), &method, &url_text, &body_digest] {
                    hasher.update(part.as_bytes());
                    hasher.update([0]);
                }
                hasher.update(occurrence.to_be_bytes());
                format!("durin-{}", &hex(&hasher.finalize())[..40])
            });
        if self.store.shared() {
            // Another node may have taken the attempt over (this one was frozen past its
            // lease, or cut off): it must still be the running one before anything goes
            // out, whatever this node remembers.
            let token = parts
                .headers
                .get(HEADER_ATTEMPT_TOKEN)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            self.running_attempt(&id, Some(attempt), token).await?;
        }
        let (status, headers, response_body, settled) = self
            .send(
                &parts.method,
                &url,
                &parts.headers,
                &idempotency_key,
                traceparent,
                body,
            )
            .await?;
        if !settled {
            // The downstream kept failing in a way that may pass: the handler gets the last
            // answer, and nothing is journaled, so the next attempt makes the call again
            // with the same key.
            let record = EgressRecord::unjournaled(status, headers, response_body);
            return Ok((record.response(false), false));
        }
        let text = String::from_utf8(response_body.clone()).ok();
        let egress_record = EgressRecord {
            method: method.clone(),
            url: url_text.clone(),
            body_digest,
            occurrence,
            idempotency_key,
            status,
            headers,
            body_base64: text
                .is_none()
                .then(|| base64::engine::general_purpose::STANDARD.encode(&response_body)),
            body: text,
        };
        let value =
            serde_json::to_vec(&egress_record).map_err(|e| ApiError::Storage(e.to_string()))?;
        let entry = NewEntry {
            index: None,
            kind: EntryKind::Egress,
            name: Some(format!("{method} {url_text}")),
            value: Some(value),
            content_type: Some("application/json".into()),
            failure: None,
            token: None,
            effect: Effect::None,
        };
        match self
            .store
            .append_entry(&id, attempt, entry, self.clock.now_ms())
            .await
        {
            Ok(_) => Ok((egress_record.response(false), true)),
            Err(error @ StoreError::Fenced { .. }) => {
                // The attempt ended while this call was out: forget what the call may have
                // brought back of its bookkeeping (a newer attempt's stays).
                self.calls.forget(&id, attempt);
                self.calls.settle(&id, attempt);
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The current attempt of a running invocation, checked against the one the caller
    /// claims to be.
    async fn running_attempt(
        &self,
        id: &InvocationId,
        claimed: Option<u32>,
        token: &str,
    ) -> Result<(u32, InvocationTrace), ApiError> {
        let record = self
            .store
            .get_invocation(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("invocation {id} not found")))?;
        if record.status != Status::Running {
            return Err(ApiError::Conflict(format!(
                "invocation {id} is {}, not running: only a running attempt may call out",
                record.status
            )));
        }
        if let Some(claimed) = claimed.filter(|a| *a != record.attempt) {
            return Err(ApiError::Conflict(format!(
                "attempt {claimed} of invocation {id} is not current (current attempt {})",
                record.attempt
            )));
        }
        if !same_secret(record.attempt_token.as_deref().unwrap_or_default(), token) {
            return Err(ApiError::Forbidden(format!(
                "the Durin-Attempt-Token does not belong to the running attempt of invocation {id}"
            )));
        }
        Ok((record.attempt, crate::telemetry::traces::trace_of(&record)))
    }

    /// Sends one outbound call, retrying what may succeed later, with the same key. The
    /// flag is false when the last answer was still one that may pass (408, 429, 5xx).
    async fn send(
        &self,
        method: &Method,
        url: &reqwest::Url,
        headers: &HeaderMap,
        idempotency_key: &str,
        traceparent: Option<&str>,
        body: bytes::Bytes,
    ) -> Result<(u16, Vec<(String, String)>, Vec<u8>, bool), ApiError> {
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes())
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // Headers the caller named in `Connection` are for the hop to the egress only
        // (RFC 9110 §7.6.1).
        let connection_options: Vec<String> = headers
            .get_all(axum::http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|option| option.trim().to_ascii_lowercase())
            .filter(|option| !option.is_empty())
            .collect();
        let mut tries = 0;
        loop {
            tries += 1;
            // The delay before the next try; `None` when this try is the last.
            let next_delay = self.config.retry_policy.next_delay(tries, None);
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .timeout(self.config.call_timeout)
                .header("idempotency-key", idempotency_key)
                .body(body.clone());
            if let Some(traceparent) = traceparent {
                request = request.header(TRACEPARENT, traceparent);
            }
            for (name, value) in headers {
                let name = name.as_str();
                // Durin's own `traceparent` replaces the handler's.
                let replaced = traceparent.is_some() && name == TRACEPARENT;
                if !hop_by_hop(name)
                    && name != "idempotency-key"
                    && !replaced
                    && !connection_options.iter().any(|option| option == name)
                {
                    request = request.header(name, value.as_bytes());
                }
            }
            let (retry_after, problem) = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let transient = status.is_server_error()
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    if !transient || next_delay.is_none() {
                        let headers = response
                            .headers()
                            .iter()
                            .filter(|(name, _)| !hop_by_hop(name.as_str()))
                            .filter_map(|(name, value)| {
                                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
                            })
                            .collect();
                        // Bounded: the answer is held in memory and journaled whole.
                        let body = read_limited(response, self.config.max_body_bytes)
                            .await
                            .map_err(|e| {
                                ApiError::Downstream(format!(
                                    "reading the answer of {url} failed: {e}; nothing was journaled"
                                ))
                            })?;
                        return Ok((status.as_u16(), headers, body, !transient));
                    }
                    (retry_after, format!("{url} answered {status}"))
                }
                Err(e) => {
                    let chain = crate::http::error_chain(&e);
                    if chain.contains(INTERNAL_REFUSED) {
                        return Err(ApiError::Forbidden(chain));
                    }
                    (None, format!("could not call {url}: {e}"))
                }
            };
            match next_delay {
                Some(delay) => {
                    let delay = retry_after
                        .unwrap_or(delay)
                        .min(self.config.retry_policy.maximum_interval);
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(ApiError::Downstream(format!(
                        "{problem} ({tries} tries); nothing was journaled, the same call may be made again"
                    )))
                }
            }
        }
    }

    /// Pauses the invocation (fenced by the attempt) and wakes its waiters.
    async fn pause(&self, id: &InvocationId, attempt: u32, reason: String) -> ApiError {
        let end = AttemptEnd::Paused {
            reason: reason.clone(),
        };
        match self.engine.end_attempt(id, attempt, end).await {
            Ok(_) => {
                self.calls.forget(id, attempt);
                ApiError::Conflict(reason)
            }
            Err(StoreError::Fenced { .. }) => ApiError::Conflict(reason),
            Err(e) => e.into(),
        }
    }
}

/// A call of a replayed handler: answered from the recording when it was recorded (the
/// same method, URL, body and occurrence), and otherwise never sent: the replay notes a
/// divergence (a recorded call to the same target that the code no longer makes the same
/// way, or any new call after a recording that ended) or the recording's frontier.
fn replayed_call(
    session: &crate::replay::Session,
    method: &str,
    url: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    let body_digest = hex(&Sha256::digest(body));
    let identity = (method.to_owned(), url.to_owned(), body_digest.clone());
    let occurrence = session.egress_occurrence(&identity);
    let recorded = recorded_calls(session.entries());
    let exact = recorded.iter().find(|(_, r)| {
        r.method == method
            && r.url == url
            && r.body_digest == body_digest
            && r.occurrence == occurrence
    });
    if let Some((index, record)) = exact {
        session.use_entry(*index);
        return Ok(record.response(true));
    }
    let instead = recorded
        .iter()
        .find(|(_, r)| {
            let seen =
                session.egress_seen(&(r.method.clone(), r.url.clone(), r.body_digest.clone()));
            r.method == method && r.url == url && seen <= r.occurrence
        })
        .map(|(index, r)| {
            (
                *index,
                format!(
                    "egress {} {} (body digest {}, occurrence {})",
                    r.method,
                    r.url,
                    r.body_digest.chars().take(12).collect::<String>(),
                    r.occurrence
                ),
            )
        });
    Err(session.beyond(
        format!(
            "egress {method} {url} (body digest {}, occurrence {occurrence})",
            &body_digest[..12]
        ),
        instead,
    ))
}

pub(super) async fn handle(State(egress): State<Arc<Egress>>, request: Request) -> Response {
    let response = match egress.serve(request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    metrics::counter!(crate::telemetry::EGRESS, "outcome" => outcome(&response)).increment(1);
    response
}

/// What became of a call, from the egress's answer: `replayed` from the journal, `failed`
/// (the egress's own 5xx problem), or `recorded`.
pub(super) fn outcome(response: &Response) -> &'static str {
    if response.headers().contains_key(HEADER_REPLAYED) {
        "replayed"
    } else if response
        .headers()
        .contains_key(crate::problem::HEADER_ERROR_SOURCE)
        && response.status().is_server_error()
    {
        "failed"
    } else {
        "recorded"
    }
}

/// The call's target: the absolute URI of a proxy-form request, or the explicit form
/// `/{scheme}/{authority}/{path}`.
pub(super) fn target_url(uri: &Uri) -> Result<reqwest::Url, ApiError> {
    let text = if uri.scheme().is_some() {
        uri.to_string()
    } else {
        let path = uri.path().trim_start_matches('/');
        let (scheme, rest) = path.split_once('/').unwrap_or((path, ""));
        if !matches!(scheme, "http" | "https") || rest.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "{uri} names no target: use proxy form (an absolute URI) or http://EGRESS/{{http|https}}/HOST/PATH"
            )));
        }
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{rest}{query}")
    };
    let url = reqwest::Url::parse(&text)
        .map_err(|e| ApiError::BadRequest(format!("target {text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::BadRequest(format!(
            "target {text:?} must be an http or https URL with a host"
        )));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_in_proxy_and_explicit_form() {
        let proxy: Uri = "http://pay.example:8080/v1/charges?x=1".parse().unwrap();
        assert_eq!(
            target_url(&proxy).unwrap().as_str(),
            "http://pay.example:8080/v1/charges?x=1"
        );
        let explicit: Uri = "/https/api.example.com/v1/charges?x=1".parse().unwrap();
        assert_eq!(
            target_url(&explicit).unwrap().as_str(),
            "https://api.example.com/v1/charges?x=1"
        );
        assert!(target_url(&"/ftp/x/y".parse().unwrap()).is_err());
        assert!(target_url(&"/v1/charges".parse().unwrap()).is_err());
    }
}
