//! Broker addresses: a list of AMQP URLs (the nodes of a RabbitMQ cluster), validated once, and
//! a [`Connector`] that connects to the first node that answers and, after a loss, to the next.
//!
//! Shared by every process that talks to the broker (the relay, consumers, `consumer-dead`), so
//! the list is parsed, validated, redacted and walked the same way everywhere.
//!
//! Why round-robin and not "always the first": after a loss the node just lost is the likeliest
//! to be down still, so the next attempt starts with the node after it; a process never waits
//! on a dead node's connect timeout before reaching a live one, and instances that lost the
//! same node spread over the others instead of piling onto entry 1.
//!
//! The list only decides where a connection goes. What makes a failover lose nothing is the
//! callers' rule, unchanged by it: the relay deletes a row only after its publisher confirm
//! arrived on a live connection (an outcome lost with the connection is published again), and a
//! consumer acks only after its transaction committed (a delivery unacked on the lost
//! connection is redelivered, and the inbox skips it if it had committed).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

/// How long one node may take to accept a connection and finish the AMQP handshake. A node
/// that accepts TCP but never answers (a partitioned or frozen host) must not stall the walk
/// to the next one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The userinfo ends at the last '@' before the path: a password may contain '@' encoded or
    // not, a path never holds the userinfo.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&rest[..at], &rest[at..]);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***{host}"),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// One validated broker address.
#[derive(Clone)]
struct BrokerUrl {
    uri: AMQPUri,
    redacted: String,
}

/// A non-empty list of validated AMQP URLs, in the order they are tried.
#[derive(Clone)]
pub struct BrokerUrls {
    urls: Vec<BrokerUrl>,
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug output ends up in logs too: never the passwords.
        f.debug_list()
            .entries(self.urls.iter().map(|u| &u.redacted))
            .finish()
    }
}

/// Why a list of broker addresses was refused. Entries are counted from 1 and shown redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// No address at all.
    #[error("no broker address given")]
    Empty,
    /// An entry between commas is blank (e.g. a trailing comma).
    #[error("entry {position} is empty")]
    EmptyEntry {
        /// Its position in the list, from 1.
        position: usize,
    },
    /// An entry is not a usable AMQP URL.
    #[error("entry {position} ({entry:?}) {reason}")]
    Invalid {
        /// Its position in the list, from 1.
        position: usize,
        /// The entry, password masked.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl BrokerUrls {
    /// Parses a comma-separated list, e.g. `amqp://u:p@node1:5672/%2f,amqp://u:p@node2:5672/%2f`
    /// (blanks around entries are ignored). A single URL is a list of one. A comma inside a
    /// password must be written `%2C`.
    pub fn parse(list: &str) -> Result<Self, UrlError> {
        if list.trim().is_empty() {
            return Err(UrlError::Empty);
        }
        Self::validate(list.split(','))
    }

    /// Takes each item as one URL (no splitting on commas).
    pub fn new<I>(urls: I) -> Result<Self, UrlError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Self::validate(urls)
    }

    fn validate<I>(entries: I) -> Result<Self, UrlError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut urls = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let position = i + 1;
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                return Err(UrlError::EmptyEntry { position });
            }
            let invalid = |reason: String| UrlError::Invalid {
                position,
                entry: redact_url(entry),
                reason,
            };
            if !entry.starts_with("amqp://") && !entry.starts_with("amqps://") {
                return Err(invalid("must start with amqp:// or amqps://".to_owned()));
            }
            let mut uri: AMQPUri = entry
                .parse()
                .map_err(|e: String| invalid(format!("is not an AMQP URL: {e}")))?;
            // amq-protocol-uri reads the host with `Url::domain`, which is empty for an IP
            // address, and then falls back to "localhost": `amqp://10.0.0.2` would quietly
            // connect to this machine. Take the host from the URL text instead.
            if let Some(ip) = ip_host(entry) {
                uri.authority.host = ip;
            }
            urls.push(BrokerUrl {
                uri,
                redacted: redact_url(entry),
            });
        }
        if urls.is_empty() {
            return Err(UrlError::Empty);
        }
        Ok(BrokerUrls { urls })
    }

    /// How many addresses.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Never true: a list holds at least one address.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Address `index` (from 0), password masked.
    pub fn redacted_entry(&self, index: usize) -> Option<&str> {
        self.urls.get(index).map(|u| u.redacted.as_str())
    }

    /// The whole list, passwords masked, comma-separated.
    pub fn redacted(&self) -> String {
        self.urls
            .iter()
            .map(|u| u.redacted.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The host of `amqp://user:pass@HOST:port/vhost` when it is an IP address (IPv6 without its
/// brackets).
fn ip_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        hostport.split_once(':').map_or(hostport, |(h, _)| h)
    };
    host.parse::<IpAddr>().ok().map(|ip| ip.to_string())
}

/// A connection made by a [`Connector`], and where it went.
pub struct Connected {
    /// The AMQP connection.
    pub connection: Connection,
    /// Which entry of the list answered (from 0).
    pub node: usize,
    /// That entry, password masked (for logs).
    pub url: String,
    /// Whether this connection went to another node than the previous one did: a failover.
    pub failover: bool,
}

/// Every node was tried once and none answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no broker node answered: {}", .attempts.iter().map(|(url, e)| format!("{url}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct ConnectError {
    /// Each node tried (password masked) and why it failed, in the order tried.
    pub attempts: Vec<(String, String)>,
}

/// Connects to the nodes of a [`BrokerUrls`] list in turn. Keep one per connection owner (a
/// relay worker, a consumer): it remembers where the last connection went.
pub struct Connector {
    urls: BrokerUrls,
    name: String,
    connect_timeout: Duration,
    /// Where the next walk starts.
    next: usize,
    /// Where the last connection went.
    last: Option<usize>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("urls", &self.urls)
            .field("name", &self.name)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector over `urls`; its connections carry `connection_name` (shown in the broker's
    /// management UI).
    pub fn new(urls: BrokerUrls, connection_name: impl Into<String>) -> Self {
        Connector {
            urls,
            name: connection_name.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            next: 0,
            last: None,
        }
    }

    /// How long one node may take to connect (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// The addresses.
    pub fn urls(&self) -> &BrokerUrls {
        &self.urls
    }

    /// Tries each node once, starting with the one after the node of the last connection (the
    /// first entry on the first call), and returns the first connection made. When none
    /// answers, the caller backs off and calls again.
    pub async fn connect(&mut self) -> Result<Connected, ConnectError> {
        let n = self.urls.len();
        let mut attempts = Vec::new();
        for step in 0..n {
            let node = (self.next + step) % n;
            let url = &self.urls.urls[node];
            // lapin's auto-recovery stays off (its default): it is reported to hang after a
            // broker restart (lapin #450); callers rebuild their whole session instead.
            let properties =
                ConnectionProperties::default().with_connection_name(self.name.as_str().into());
            let connect = Connection::connect_uri(url.uri.clone(), properties);
            let error = match tokio::time::timeout(self.connect_timeout, connect).await {
                Ok(Ok(connection)) => {
                    let failover = self.last.is_some_and(|last| last != node);
                    self.last = Some(node);
                    self.next = (node + 1) % n;
                    if failover {
                        tracing::warn!(connection = %self.name, broker = %url.redacted, node, "failed over to another broker node");
                    } else {
                        tracing::info!(connection = %self.name, broker = %url.redacted, node, "connected to broker");
                    }
                    return Ok(Connected {
                        connection,
                        node,
                        url: url.redacted.clone(),
                        failover,
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.connect_timeout),
            };
            tracing::debug!(connection = %self.name, broker = %url.redacted, cause = %error, "broker node did not answer");
            attempts.push((url.redacted.clone(), error));
        }
        Err(ConnectError { attempts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_url_is_a_list_of_one() {
        let urls = BrokerUrls::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(urls.len(), 1);
        assert_eq!(urls.redacted(), "amqp://guest:***@127.0.0.1:5672/%2f");
    }

    #[test]
    fn a_comma_list_keeps_its_order_and_ignores_blanks_around_entries() {
        let urls = BrokerUrls::parse("amqp://a:1@h1:5672/%2f , amqps://b:2@h2:5671/v").unwrap();
        assert_eq!(urls.len(), 2);
        assert_eq!(
            urls.redacted(),
            "amqp://a:***@h1:5672/%2f,amqps://b:***@h2:5671/v"
        );
    }

    #[test]
    fn a_bad_entry_is_named_by_position_and_shown_redacted() {
        let err = BrokerUrls::parse("amqp://g:g@h1/%2f,foo").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"entry 2 ("foo") must start with amqp:// or amqps://"#
        );
        let err = BrokerUrls::parse("amqp://g:g@h1/%2f,http://u:hunter2@h2").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("entry 2 (\"http://u:***@h2\")"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn an_unparsable_entry_says_why() {
        let err = BrokerUrls::parse("amqp://u:secret@h1:notaport/%2f").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("entry 1 ("), "{text}");
        assert!(text.contains("is not an AMQP URL"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn empty_lists_and_entries_are_refused() {
        assert_eq!(BrokerUrls::parse("").unwrap_err(), UrlError::Empty);
        assert_eq!(BrokerUrls::parse("  ").unwrap_err(), UrlError::Empty);
        assert_eq!(
            BrokerUrls::parse("amqp://h1,").unwrap_err(),
            UrlError::EmptyEntry { position: 2 }
        );
        assert_eq!(
            BrokerUrls::new(Vec::<String>::new()).unwrap_err(),
            UrlError::Empty
        );
    }

    #[test]
    fn separate_urls_are_not_split_on_commas() {
        // A password with a raw comma only works through `new`.
        let urls = BrokerUrls::new(["amqp://u:a,b@h1:5672/%2f"]).unwrap();
        assert_eq!(urls.len(), 1);
        assert_eq!(urls.urls[0].uri.authority.userinfo.password, "a,b");
    }

    #[test]
    fn ip_hosts_are_kept() {
        let urls = BrokerUrls::parse("amqp://u:p@10.20.0.2:5673/%2f,amqp://[::1]:5674").unwrap();
        assert_eq!(urls.urls[0].uri.authority.host, "10.20.0.2");
        assert_eq!(urls.urls[0].uri.authority.port, 5673);
        assert_eq!(urls.urls[1].uri.authority.host, "::1");
        assert_eq!(urls.urls[1].uri.authority.port, 5674);
        let named = BrokerUrls::parse("amqp://u:p@rabbit-2:5672/%2f").unwrap();
        assert_eq!(named.urls[0].uri.authority.host, "rabbit-2");
    }

    #[test]
    fn redaction_masks_only_the_password() {
        assert_eq!(
            redact_url("amqp://guest:hunter2@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
        assert_eq!(redact_url("amqp://user@h/%2f"), "amqp://user@h/%2f");
        assert_eq!(redact_url("amqp://u:p@ss@h/a@b"), "amqp://u:***@h/a@b");
    }

    #[test]
    fn debug_output_hides_passwords() {
        let urls = BrokerUrls::parse("amqp://u:hunter2@h1,amqp://u:hunter3@h2").unwrap();
        let text = format!("{:?}", Connector::new(urls, "t"));
        assert!(!text.contains("hunter"), "{text}");
    }
}
