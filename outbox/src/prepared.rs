//! Prepared ("half") messages: store a message now, decide later whether it is published.
//!
//! For a producer whose business change does not commit in the outbox database (another
//! database, an external system), a message cannot ride in the same transaction. Instead:
//!
//! 1. [`prepare`] the message (or [`Client::prepare`] over the relay's HTTP API): it is stored
//!    but not published, and gets its final [`MessageId`];
//! 2. do the business change, recording the decision with [`crate::barrier::record_commit`]
//!    inside that business transaction;
//! 3. [`Prepared::commit`] (or [`Prepared::rollback`]): commit moves the message into the
//!    outbox, with its id kept, and the relay publishes it.
//!
//! If step 3 never arrives (the producer died), the relay asks the producer's `check_url`
//! (`GET {check_url}?message_id=ID`, see [`crate::barrier::check_handler`]) and decides from
//! the answer, or parks the message as unresolved for an operator. A decision is final: commit
//! and rollback are idempotent, and the one that comes second after the other is refused with
//! [`PreparedError::Conflict`].

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use serde::Deserialize;
use sqlx::PgExecutor;

use crate::{Message, MessageId};

/// Why a prepared-message operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreparedError {
    /// The message or a request field was refused by validation (the text names the field).
    #[error("{0}")]
    Invalid(String),
    /// The payload or the headers are over the outbox's size limit (the text names which).
    #[error("{0}")]
    TooLarge(String),
    /// No prepared message with this id is known (never prepared, or its outcome was pruned).
    #[error("no prepared message with id {0}")]
    NotFound(MessageId),
    /// The message was already decided the other way; nothing changed.
    #[error("prepared message {id} was already {decided}")]
    Conflict {
        /// The message.
        id: MessageId,
        /// The decision in effect.
        decided: Decision,
    },
    /// The database failed or refused the operation for another reason.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// The relay's HTTP API could not be reached or its answer could not be read.
    #[error("relay API request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The relay's HTTP API answered with an error not covered by another variant.
    #[error("relay API answered {status}: {detail}")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The problem detail from the response.
        detail: String,
    },
}

impl From<sqlx::Error> for PreparedError {
    fn from(err: sqlx::Error) -> Self {
        // The SQL API raises these SQLSTATEs for bad input, with a message naming the field:
        // invalid_parameter_value, null_value_not_allowed, and program_limit_exceeded for sizes.
        if let sqlx::Error::Database(db) = &err {
            match db.code().as_deref() {
                Some("22023" | "22004") => return PreparedError::Invalid(db.message().to_owned()),
                Some("54000") => return PreparedError::TooLarge(db.message().to_owned()),
                _ => {}
            }
        }
        PreparedError::Database(err)
    }
}

/// The final decision on a prepared message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Published: moved into the outbox with its id kept.
    Committed,
    /// Never published: removed.
    RolledBack,
}

impl Decision {
    /// The name used in SQL, JSON and the check protocol: `committed` or `rolled_back`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Committed => "committed",
            Decision::RolledBack => "rolled_back",
        }
    }

    fn from_sql(s: &str) -> Option<Decision> {
        match s {
            "committed" => Some(Decision::Committed),
            "rolled_back" => Some(Decision::RolledBack),
            _ => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::Committed => "committed",
            Decision::RolledBack => "rolled back",
        })
    }
}

impl FromStr for Decision {
    type Err = String;
    /// Accepts `commit`/`committed` and `rollback`/`rolled_back` (as typed on a command line).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "commit" | "committed" => Ok(Decision::Committed),
            "rollback" | "rolled_back" | "rolled-back" => Ok(Decision::RolledBack),
            other => Err(format!(
                "decision must be `commit` or `rollback`, got `{other}`"
            )),
        }
    }
}

/// Who made a decision (recorded with the outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The producer, through this library or the relay's HTTP API.
    Producer,
    /// The relay, from the producer's answer to a check.
    Checkback,
    /// An operator (`outbox-relay prepared resolve`).
    Operator,
}

impl DecidedBy {
    fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Producer => "producer",
            DecidedBy::Checkback => "checkback",
            DecidedBy::Operator => "operator",
        }
    }
}

/// Where a prepared message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a decision; the relay checks back.
    Pending,
    /// Checks used up without an answer: parked until the producer or an operator decides.
    Unresolved,
    /// Committed: published or about to be.
    Committed,
    /// Rolled back: never published.
    RolledBack,
}

impl Status {
    /// The name used in SQL and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Unresolved => "unresolved",
            Status::Committed => "committed",
            Status::RolledBack => "rolled_back",
        }
    }

    fn from_sql(s: &str) -> Option<Status> {
        match s {
            "pending" => Some(Status::Pending),
            "unresolved" => Some(Status::Unresolved),
            "committed" => Some(Status::Committed),
            "rolled_back" => Some(Status::RolledBack),
            _ => None,
        }
    }
}

/// A prepared message, waiting for [`commit`](Prepared::commit) or
/// [`rollback`](Prepared::rollback). Keep its id (it is the message id the consumers will see):
/// a producer that restarts resumes with [`Prepared::from_id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    id: MessageId,
}

impl Prepared {
    /// The handle for a message prepared earlier.
    pub fn from_id(id: MessageId) -> Self {
        Prepared { id }
    }

    /// The message id (also the AMQP `message_id` once published).
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Moves the message into the outbox (the relay then publishes it), in `executor`'s
    /// transaction when it is one. Idempotent; [`PreparedError::Conflict`] when it was rolled
    /// back before.
    pub async fn commit<'e, E: PgExecutor<'e>>(&self, executor: E) -> Result<(), PreparedError> {
        decide_expecting(executor, self.id, Decision::Committed, DecidedBy::Producer).await
    }

    /// Removes the message: it is never published. Idempotent; [`PreparedError::Conflict`] when
    /// it was committed before.
    pub async fn rollback<'e, E: PgExecutor<'e>>(&self, executor: E) -> Result<(), PreparedError> {
        decide_expecting(executor, self.id, Decision::RolledBack, DecidedBy::Producer).await
    }

    /// Where the message stands.
    pub async fn status<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
    ) -> Result<Status, PreparedError> {
        status(executor, self.id).await
    }
}

/// Stores `msg` as a prepared message and returns its handle. `check_url` is where the relay
/// asks for the decision if none arrives (`GET {check_url}?message_id=ID`); without one, an
/// undecided message is parked as unresolved once its checks are used up.
///
/// The prepared message must be visible to the relay before the business change happens (so a
/// producer crash right after it is still checked back): run this on a pool or its own
/// transaction, not inside a business transaction on another database.
///
/// A dedupe key is refused: a prepared message keeps the id it was given here. A delay counts
/// from now (database time).
pub async fn prepare<'e, E: PgExecutor<'e>>(
    executor: E,
    msg: &Message,
    check_url: Option<&str>,
) -> Result<Prepared, PreparedError> {
    if msg.dedupe_key.is_some() {
        return Err(PreparedError::Invalid(
            "dedupe_key is not supported for prepared messages (a prepared message keeps its id)"
                .to_owned(),
        ));
    }
    let headers = msg.stored_headers();
    let id: i64 = sqlx::query_scalar(
        "SELECT outbox.prepare(exchange => $1, routing_key => $2, payload => $3, headers => $4, \
             ordering_key => $5, \
             deliver_at => coalesce($6, now() + $7 * interval '1 millisecond'), \
             check_url => $8, content_type => $9)",
    )
    .bind(&msg.exchange)
    .bind(&msg.routing_key)
    .bind(&msg.payload)
    .bind(headers)
    .bind(&msg.ordering_key)
    .bind(msg.deliver_at)
    .bind(msg.delay.map(|d| d.as_millis() as i64))
    .bind(check_url)
    .bind(&msg.content_type)
    .fetch_one(executor)
    .await?;
    Ok(Prepared { id: MessageId(id) })
}

/// Applies `decision` to message `id` and returns the decision in effect afterwards: `decision`
/// itself (newly made or made before), the other one when the message was already decided the
/// other way (nothing changed), or `None` when the id is unknown. For callers that map each case
/// themselves (the relay's API and check-back); [`Prepared::commit`] and
/// [`Prepared::rollback`] turn the other cases into errors.
pub async fn decide<'e, E: PgExecutor<'e>>(
    executor: E,
    id: MessageId,
    decision: Decision,
    by: DecidedBy,
) -> Result<Option<Decision>, PreparedError> {
    let sql = match decision {
        Decision::Committed => "SELECT outbox.commit_prepared($1, $2)",
        Decision::RolledBack => "SELECT outbox.rollback_prepared($1, $2)",
    };
    let in_effect: Option<String> = sqlx::query_scalar(sql)
        .bind(id.0)
        .bind(by.as_str())
        .fetch_one(executor)
        .await?;
    Ok(in_effect.as_deref().and_then(Decision::from_sql))
}

/// [`decide`], with the other outcomes as errors: `Ok` only when `decision` is in effect.
pub async fn decide_expecting<'e, E: PgExecutor<'e>>(
    executor: E,
    id: MessageId,
    decision: Decision,
    by: DecidedBy,
) -> Result<(), PreparedError> {
    match decide(executor, id, decision, by).await? {
        Some(d) if d == decision => Ok(()),
        Some(decided) => Err(PreparedError::Conflict { id, decided }),
        None => Err(PreparedError::NotFound(id)),
    }
}

/// Where message `id` stands; [`PreparedError::NotFound`] when it is unknown.
pub async fn status<'e, E: PgExecutor<'e>>(
    executor: E,
    id: MessageId,
) -> Result<Status, PreparedError> {
    let s: Option<String> = sqlx::query_scalar("SELECT outbox.prepared_status($1)")
        .bind(id.0)
        .fetch_one(executor)
        .await?;
    s.as_deref()
        .and_then(Status::from_sql)
        .ok_or(PreparedError::NotFound(id))
}

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

#[derive(Deserialize)]
struct IdBody {
    id: String,
}

#[derive(Deserialize)]
struct StatusBody {
    status: Status,
}

#[derive(Deserialize, Default)]
struct ProblemBody {
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    title: Option<String>,
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
        let mut body = serde_json::json!({
            "exchange": msg.exchange,
            "routing_key": msg.routing_key,
            "payload_base64": base64::engine::general_purpose::STANDARD.encode(&msg.payload),
            "headers": msg.stored_headers(),
        });
        let obj = body.as_object_mut().expect("a JSON object literal");
        if let Some(k) = &msg.ordering_key {
            obj.insert("ordering_key".into(), k.clone().into());
        }
        if let Some(ct) = &msg.content_type {
            obj.insert("content_type".into(), ct.clone().into());
        }
        if let Some(at) = deliver_at {
            obj.insert("deliver_at".into(), at.to_rfc3339().into());
        }
        if let Some(url) = check_url {
            obj.insert("check_url".into(), url.into());
        }
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
        let StatusBody { status } = resp.json().await?;
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
