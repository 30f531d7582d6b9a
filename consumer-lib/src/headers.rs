//! AMQP header tables: reading typed values, and converting to JSON for the compensation log
//! and back for a replay.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

/// Headers RabbitMQ adds when it dead-letters a message (our delay queues do, every time);
/// they would grow with every retry and mean nothing to the handler.
const BROKER_DEATH_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

pub(crate) fn str_value<'a>(table: &'a FieldTable, name: &str) -> Option<&'a str> {
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

pub(crate) fn int_value(table: &FieldTable, name: &str) -> Option<i64> {
    match table.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().parse().ok(),
        _ => None,
    }
}

/// Makes `span` (a message's processing span) the child of the span that published the
/// message, named by its W3C `traceparent` header: the relay's `outbox.publish` span when the
/// relay exports traces, else the producer's span whose context the relay passed on.
pub(crate) fn continue_trace(span: &tracing::Span, table: &FieldTable) {
    telemetry::set_parent(span, |name| str_value(table, name));
}

/// A copy of `table` without the broker's dead-lettering bookkeeping.
pub(crate) fn without_death_headers(table: &FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in table {
        if !BROKER_DEATH_HEADERS.contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Headers as a JSON object: strings stay strings (bytes that are not UTF-8 become lossy
/// text), numbers numbers, tables objects.
pub fn to_json(table: &FieldTable) -> Value {
    let mut map = Map::new();
    for (k, v) in table {
        map.insert(k.as_str().to_owned(), value_to_json(v));
    }
    Value::Object(map)
}

fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(v) => Value::from(*v),
        AMQPValue::ShortShortUInt(v) => Value::from(*v),
        AMQPValue::ShortInt(v) => Value::from(*v),
        AMQPValue::ShortUInt(v) => Value::from(*v),
        AMQPValue::LongInt(v) => Value::from(*v),
        AMQPValue::LongUInt(v) => Value::from(*v),
        AMQPValue::LongLongInt(v) => Value::from(*v),
        AMQPValue::Float(v) => Number::from_f64(f64::from(*v)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(v) => Number::from_f64(*v).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => Value::String(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => to_json(t),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// The reverse of [`to_json`] for a replay: strings become long strings, integers 64-bit
/// integers. Keys longer than an AMQP short string are dropped (they cannot be sent).
pub fn from_json(value: &Value) -> FieldTable {
    let mut table = FieldTable::default();
    if let Value::Object(map) = value {
        for (k, v) in map {
            if let Ok(key) = ShortString::try_new(k.as_str()) {
                table.insert(key, json_to_value(v));
            }
        }
    }
    table
}

fn json_to_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(json_to_value).collect::<Vec<_>>(),
        )),
        Value::Object(_) => AMQPValue::FieldTable(from_json(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_strings_and_numbers() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongString("x".into()));
        t.insert("n".into(), AMQPValue::LongInt(7));
        let json = to_json(&t);
        assert_eq!(json, serde_json::json!({"a": "x", "n": 7}));
        let back = from_json(&json);
        assert_eq!(str_value(&back, "a"), Some("x"));
        assert_eq!(int_value(&back, "n"), Some(7));
    }
}
