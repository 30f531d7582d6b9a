//! The JSON of the prepared-message protocol, one serde type per document, shared by both ends
//! so that neither writes it by hand:
//!
//! - the relay's API (`/v1/prepared`): [`PrepareBody`] in, [`IdBody`] and [`StatusBody`] out,
//!   a problem document ([`ProblemBody`]) on error;
//! - the check (`GET {check_url}?message_id=ID`): [`CheckReply`], whose `status` is a
//!   [`CheckAnswer`].
//!
//! The relay parses [`PrepareBody`]'s fields itself, to name the field in every refusal;
//! everything else is read with these types.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The final decision on a prepared message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

    pub(crate) fn from_sql(s: &str) -> Option<Decision> {
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

/// Where a prepared message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

    pub(crate) fn from_sql(s: &str) -> Option<Status> {
        match s {
            "pending" => Some(Status::Pending),
            "unresolved" => Some(Status::Unresolved),
            "committed" => Some(Status::Committed),
            "rolled_back" => Some(Status::RolledBack),
            _ => None,
        }
    }
}

/// The answer to a check: the check protocol's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckAnswer {
    /// A decision is recorded (or was just recorded as rolled back).
    Decided(Decision),
    /// The business transaction is still open; ask again later.
    Pending,
}

impl CheckAnswer {
    /// The `status` value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckAnswer::Decided(d) => d.as_str(),
            CheckAnswer::Pending => "pending",
        }
    }
}

impl Serialize for CheckAnswer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CheckAnswer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "committed" => Ok(CheckAnswer::Decided(Decision::Committed)),
            "rolled_back" => Ok(CheckAnswer::Decided(Decision::RolledBack)),
            "pending" => Ok(CheckAnswer::Pending),
            other => Err(serde::de::Error::custom(format!(
                "status `{other}` is not committed, rolled_back or pending"
            ))),
        }
    }
}

/// The check endpoint's answer: `{"status":"committed"|"rolled_back"|"pending"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReply {
    /// What the producer's database says.
    pub status: CheckAnswer,
}

/// `POST /v1/prepared`: the message to prepare. The payload travels as base64, so any bytes
/// arrive unchanged; absent options are left out.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareBody<'a> {
    /// The exchange to publish to.
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The payload, standard base64.
    pub payload_base64: String,
    /// The AMQP headers.
    pub headers: &'a serde_json::Value,
    /// Messages with one ordering key are published in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<&'a str>,
    /// The AMQP `content_type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'a str>,
    /// Not published before this instant (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_at: Option<DateTime<Utc>>,
    /// Where the relay asks for the decision when none arrives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_url: Option<&'a str>,
}

/// `201` to a prepare: the message id, in decimal (a JSON number would lose precision in
/// clients that read numbers as doubles).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdBody {
    /// The message id.
    pub id: String,
}

/// `200` to a status read or a decision: the message id and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusBody {
    /// The message id, in decimal (a client reads it as optional: it knows the id it asked for).
    #[serde(default)]
    pub id: String,
    /// Where it stands.
    pub status: Status,
}

/// The fields of a problem document (RFC 9457) a client reads from an error answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProblemBody {
    /// The explanation of this occurrence.
    #[serde(default)]
    pub detail: Option<String>,
    /// The short title.
    #[serde(default)]
    pub title: Option<String>,
}

impl From<Decision> for Status {
    fn from(d: Decision) -> Self {
        match d {
            Decision::Committed => Status::Committed,
            Decision::RolledBack => Status::RolledBack,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_replies_read_and_write_the_protocol_names() {
        for (json, answer) in [
            (
                r#"{"status":"committed"}"#,
                CheckAnswer::Decided(Decision::Committed),
            ),
            (
                r#"{"status":"rolled_back"}"#,
                CheckAnswer::Decided(Decision::RolledBack),
            ),
            (r#"{"status":"pending"}"#, CheckAnswer::Pending),
        ] {
            let reply: CheckReply = serde_json::from_str(json).unwrap();
            assert_eq!(reply.status, answer);
            assert_eq!(serde_json::to_string(&reply).unwrap(), json);
        }
        let err = serde_json::from_str::<CheckReply>(r#"{"status":"maybe"}"#).unwrap_err();
        assert!(
            err.to_string().contains("`maybe` is not committed"),
            "{err}"
        );
    }

    #[test]
    fn status_body_matches_the_api() {
        let body = StatusBody {
            id: "42".into(),
            status: Decision::RolledBack.into(),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"id":"42","status":"rolled_back"}"#
        );
    }
}
