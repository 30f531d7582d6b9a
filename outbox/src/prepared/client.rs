//! The client of the relay's prepared-message HTTP API (feature `client`), for producers that
//! do not connect to the outbox database. Its requests and answers are the [`super::wire`]
//! types the relay reads and writes.

use base64::Engine as _;

use super::wire::{IdBody, PrepareBody, ProblemBody, StatusBody};
use super::{Decision, PreparedError, Status};
use crate::{Message, MessageId};

/// A client of the relay's prepared-message HTTP API (`/v1/prepared`), for producers that do
/// not connect to the outbox database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    token: Option<String>,
}

/// A message prepared through a [`Client`], waiting for commit or rollback.
#[derive(Debug, Clone)]
pub struct RemotePrepared {
    client: Client,
    id: MessageId,
}

impl Client {
    /// A client of the relay at `base_url` (its `RELAY_HTTP_ADDR`, e.g.
    /// `http://127.0.0.1:9464`).
    pub fn new(base_url: &str) -> Result<Self, PreparedError> {
        let mut base = reqwest::Url::parse(base_url)
            .map_err(|e| PreparedError::Invalid(format!("base_url `{base_url}`: {e}")))?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Client {
            http: reqwest::Client::new(),
            base,
            token: None,
        })
    }

    /// Sends `Authorization: Bearer {token}` (required when the relay has a token configured).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Uses this HTTP client (timeouts, proxies) instead of a default one.
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// The handle for a message prepared earlier through the API.
    pub fn handle(&self, id: MessageId) -> RemotePrepared {
        RemotePrepared {
            client: self.clone(),
            id,
        }
    }

    /// Prepares `msg` through the relay (`POST /v1/prepared`). See [`prepare`] for
    /// `check_url`. The payload travels as base64, so any bytes arrive unchanged.
    pub async fn prepare(
        &self,
        msg: &Message,
        check_url: Option<&str>,
    ) -> Result<RemotePrepared, PreparedError> {
        if msg.dedupe_key.is_some() {
            return Err(PreparedError::Invalid(
                "dedupe_key is not supported for prepared messages (a prepared message keeps its id)"
                    .to_owned(),
            ));
        }
        let deliver_at = match (msg.deliver_at, msg.delay) {
            (Some(at), _) => Some(at),
            (None, Some(delay)) => chrono::Duration::from_std(delay)
                .ok()
                .map(|d| chrono::Utc::now() + d),
            (None, None) => None,
        };
        let headers = msg.stored_headers();
        let body = PrepareBody {
            exchange: &msg.exchange,
            routing_key: &msg.routing_key,
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&msg.payload),
            headers: &headers,
            ordering_key: msg.ordering_key.as_deref(),
            content_type: msg.content_type.as_deref(),
            deliver_at,
            check_url,
        };
        let resp = self
            .request(reqwest::Method::POST, "v1/prepared")?
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(problem(resp, None, None).await);
        }
        let IdBody { id } = resp.json().await?;
        let id = id.parse().map_err(|_| PreparedError::Api {
            status: 201,
            detail: format!("the relay answered an id that is not a decimal integer: `{id}`"),
        })?;
        Ok(self.handle(id))
    }

    /// Commits message `id` (`POST /v1/prepared/{id}/commit`). Idempotent.
    pub async fn commit(&self, id: MessageId) -> Result<(), PreparedError> {
        self.decide(id, Decision::Committed).await
    }

    /// Rolls message `id` back (`POST /v1/prepared/{id}/rollback`). Idempotent.
    pub async fn rollback(&self, id: MessageId) -> Result<(), PreparedError> {
        self.decide(id, Decision::RolledBack).await
    }

    /// Where message `id` stands (`GET /v1/prepared/{id}`).
    pub async fn status(&self, id: MessageId) -> Result<Status, PreparedError> {
        let resp = self
            .request(reqwest::Method::GET, &format!("v1/prepared/{id}"))?
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(problem(resp, Some(id), None).await);
        }
        let StatusBody { status, .. } = resp.json().await?;
        Ok(status)
    }

    async fn decide(&self, id: MessageId, decision: Decision) -> Result<(), PreparedError> {
        let verb = match decision {
            Decision::Committed => "commit",
            Decision::RolledBack => "rollback",
        };
        let resp = self
            .request(reqwest::Method::POST, &format!("v1/prepared/{id}/{verb}"))?
            .send()
            .await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let other = match decision {
            Decision::Committed => Decision::RolledBack,
            Decision::RolledBack => Decision::Committed,
        };
        Err(problem(resp, Some(id), Some(other)).await)
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, PreparedError> {
        let url = self
            .base
            .join(path)
            .map_err(|e| PreparedError::Invalid(format!("request path `{path}`: {e}")))?;
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        Ok(req)
    }
}

/// Turns an error response into the matching [`PreparedError`].
async fn problem(
    resp: reqwest::Response,
    id: Option<MessageId>,
    conflicting: Option<Decision>,
) -> PreparedError {
    let status = resp.status().as_u16();
    let body: ProblemBody = resp.json().await.unwrap_or_default();
    let detail = body
        .detail
        .or(body.title)
        .unwrap_or_else(|| format!("HTTP {status}"));
    match (status, id, conflicting) {
        (404, Some(id), _) => PreparedError::NotFound(id),
        (409, Some(id), Some(decided)) => PreparedError::Conflict { id, decided },
        (413, _, _) => PreparedError::TooLarge(detail),
        (400 | 422, _, _) => PreparedError::Invalid(detail),
        _ => PreparedError::Api { status, detail },
    }
}

impl RemotePrepared {
    /// The message id (also the AMQP `message_id` once published).
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Commits the message through the relay. Idempotent; [`PreparedError::Conflict`] when it
    /// was rolled back before.
    pub async fn commit(&self) -> Result<(), PreparedError> {
        self.client.commit(self.id).await
    }

    /// Rolls the message back through the relay. Idempotent; [`PreparedError::Conflict`] when
    /// it was committed before.
    pub async fn rollback(&self) -> Result<(), PreparedError> {
        self.client.rollback(self.id).await
    }

    /// Where the message stands.
    pub async fn status(&self) -> Result<Status, PreparedError> {
        self.client.status(self.id).await
    }
}
