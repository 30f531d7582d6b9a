//! Where a request's lock key comes from.

use http::HeaderName;

/// The configured source of a lock key (`lock.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockKeySource {
    /// `header:NAME`: a request header.
    Header(HeaderName),
    /// `path:N`: segment N (0-based) of the path after the route prefix.
    PathSegment(usize),
    /// `json:FIELD`: a field of the JSON body; dots reach into objects (`order.id`).
    Json(Vec<String>),
}

impl LockKeySource {
    /// Parses `header:NAME`, `path:N` or `json:FIELD`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (kind, arg) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}` must be header:NAME, path:N or json:FIELD"))?;
        match kind {
            "header" => HeaderName::try_from(arg)
                .map(Self::Header)
                .map_err(|_| format!("`{arg}` is not a valid header name")),
            "path" => arg
                .parse()
                .map(Self::PathSegment)
                .map_err(|_| format!("`{arg}` is not a segment number")),
            "json" if !arg.is_empty() && arg.split('.').all(|p| !p.is_empty()) => {
                Ok(Self::Json(arg.split('.').map(str::to_owned).collect()))
            }
            "json" => Err(format!("`{arg}` is not a field path")),
            _ => Err(format!("`{kind}` is not one of header, path, json")),
        }
    }

    /// The key of one request, or why it has none.
    pub fn extract(
        &self,
        headers: &http::HeaderMap,
        rest_path: &str,
        body: &[u8],
    ) -> Result<String, String> {
        let value = match self {
            Self::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| format!("header {name} is missing or empty"))?,
            Self::PathSegment(n) => rest_path
                .split('?')
                .next()
                .unwrap_or("")
                .split('/')
                .filter(|s| !s.is_empty())
                .nth(*n)
                .map(str::to_owned)
                .ok_or_else(|| format!("the path has no segment {n} after the route prefix"))?,
            Self::Json(path) => {
                let doc: serde_json::Value = serde_json::from_slice(body)
                    .map_err(|e| format!("the body is not JSON: {e}"))?;
                let mut v = &doc;
                for part in path {
                    v = v.get(part).ok_or_else(|| {
                        format!("the JSON body has no field `{}`", path.join("."))
                    })?;
                }
                match v {
                    serde_json::Value::String(s) if !s.is_empty() => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => {
                        return Err(format!(
                            "the JSON field `{}` must be a non-empty string or a number",
                            path.join(".")
                        ));
                    }
                }
            }
        };
        if value.len() > 512 {
            return Err("the lock key is longer than 512 bytes".into());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_extract() {
        let mut h = http::HeaderMap::new();
        h.insert("x-order-id", "42".parse().unwrap());
        let src = LockKeySource::parse("header:X-Order-Id").unwrap();
        assert_eq!(src.extract(&h, "/", b"").unwrap(), "42");
        let src = LockKeySource::parse("path:1").unwrap();
        assert_eq!(src.extract(&h, "/orders/7/pay?x=1", b"").unwrap(), "7");
        let src = LockKeySource::parse("json:order.id").unwrap();
        assert_eq!(src.extract(&h, "/", br#"{"order":{"id":9}}"#).unwrap(), "9");
        assert!(src.extract(&h, "/", b"{}").is_err());
        assert!(LockKeySource::parse("cookie:x").is_err());
        assert!(LockKeySource::parse("json:").is_err());
    }
}
