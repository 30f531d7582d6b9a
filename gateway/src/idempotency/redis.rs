//! Records as Redis hashes (`gw:idem:{caller}:{key}`). Each decision is one Lua script, so it is
//! atomic on the server; time comes from Redis `TIME`, so gateways with skewed clocks agree on
//! leases. Redis expires records itself with the TTL.

use redis::{Script, aio::MultiplexedConnection};
use uuid::Uuid;

use super::store::{Begin, RecordSpec, StoreError, StoredResponse};

const BEGIN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'fp', 'state', 'lease_until', 'settle_by')
local function claim()
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'token', ARGV[2], 'state', 'in_flight',
    'lease_until', now + tonumber(ARGV[3]), 'settle_by', now + tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'started'}
end
if not r[1] then return claim() end
if r[1] ~= ARGV[1] then return {'mismatch'} end
if r[2] == 'in_flight' then
  local lease = tonumber(r[3])
  if lease <= now then return claim() end
  local unknown = '0'
  if tonumber(r[4]) < now then unknown = '1' end
  return {'in_flight', tostring(lease - now), unknown}
end
local c = redis.call('HMGET', KEYS[1], 'status', 'headers', 'body')
return {'completed', c[1], c[2], c[3]}
"#;

const COMPLETE: &str = r#"
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'in_flight' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[2], 'headers', ARGV[3], 'body', ARGV[4])
redis.call('HDEL', KEYS[1], 'lease_until', 'settle_by')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"#;

const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'in_flight' then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// The Redis record store.
#[derive(Clone)]
pub struct RedisRecords {
    conn: MultiplexedConnection,
    prefix: String,
}

impl RedisRecords {
    /// On a multiplexed connection; `prefix` separates deployments sharing one Redis.
    pub fn new(conn: MultiplexedConnection, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
        }
    }

    fn key(&self, spec: &RecordSpec) -> String {
        // Length-prefixing the caller keeps ("a:b", "c") and ("a", "b:c") apart.
        format!(
            "{}idem:{}:{}:{}",
            self.prefix,
            spec.caller.len(),
            spec.caller,
            spec.key
        )
    }

    pub(super) async fn begin(&self, spec: &RecordSpec) -> Result<Begin, StoreError> {
        let token = Uuid::new_v4();
        let mut conn = self.conn.clone();
        let reply: Vec<Option<Vec<u8>>> = Script::new(BEGIN)
            .key(self.key(spec))
            .arg(&spec.fingerprint[..])
            .arg(token.to_string())
            .arg(spec.lease_ms)
            .arg(spec.settle_ms)
            .arg(spec.ttl_secs.saturating_mul(1000))
            .invoke_async(&mut conn)
            .await?;
        let field = |i: usize| reply.get(i).cloned().flatten().unwrap_or_default();
        let text = |i: usize| String::from_utf8(field(i)).unwrap_or_default();
        match text(0).as_str() {
            "started" => Ok(Begin::Started { token }),
            "mismatch" => Ok(Begin::Mismatch),
            "in_flight" => Ok(Begin::InFlight {
                lease_left_ms: text(1).parse().unwrap_or(0),
                outcome_unknown: text(2) == "1",
            }),
            "completed" => {
                let status = text(1)
                    .parse()
                    .map_err(|_| StoreError::Corrupt("status".into()))?;
                let headers: serde_json::Value = serde_json::from_slice(&field(2))
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(Begin::Completed(StoredResponse {
                    status,
                    headers: StoredResponse::headers_from_json(&headers)?,
                    body: field(3),
                }))
            }
            other => Err(StoreError::Corrupt(format!(
                "unexpected script reply {other:?}"
            ))),
        }
    }

    pub(super) async fn complete(
        &self,
        spec: &RecordSpec,
        token: Uuid,
        response: &StoredResponse,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let headers = serde_json::to_vec(&response.headers_json())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let done: i64 = Script::new(COMPLETE)
            .key(self.key(spec))
            .arg(token.to_string())
            .arg(response.status)
            .arg(headers)
            .arg(&response.body[..])
            .arg(spec.ttl_secs.saturating_mul(1000))
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }

    pub(super) async fn release(&self, spec: &RecordSpec, token: Uuid) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let done: i64 = Script::new(RELEASE)
            .key(self.key(spec))
            .arg(token.to_string())
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }
}
