//! The subscriber every binary installs: log lines filtered by `RUST_LOG`, and, only when an
//! OTLP endpoint is configured, an OpenTelemetry layer exporting the same spans over OTLP/HTTP
//! (JSON bodies; no gRPC stack is built).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The standard variable naming the collector's base URL (`/v1/traces` is appended).
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The standard variable naming the full traces URL (used as it is).
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The standard variable naming this service in the exported resource.
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

/// The spans exported by default: the product's, at info and above; the libraries under it
/// (sqlx, lapin, hyper, reqwest) only at warn, so a trace shows the message's path and not
/// every poll of a connection.
pub const EXPORT_FILTER: &str = "info,sqlx=warn,lapin=warn,amq_protocol=warn,hyper=warn,hyper_util=warn,h2=warn,reqwest=warn,tower=warn";

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// The full OTLP/HTTP traces URL (`http://host:4318/v1/traces`); `None`: no export.
    pub traces_endpoint: Option<String>,
    /// The log filter when `RUST_LOG` is unset.
    pub default_filter: String,
    /// Which spans are exported, independent of `RUST_LOG` (quiet logs keep whole traces):
    /// [`EXPORT_FILTER`] unless set otherwise.
    pub export_filter: String,
    /// Log lines go to standard error instead of standard output.
    pub stderr: bool,
}

impl Options {
    /// From the standard OpenTelemetry variables: export is on when
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set and not
    /// empty, and off when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    /// `OTEL_SERVICE_NAME` overrides `service`.
    pub fn from_env(service: &str, default_filter: &str) -> Options {
        Self::from_lookup(service, default_filter, |k| std::env::var(k).ok())
    }

    /// [`Options::from_env`] with the environment given by `var` (for tests).
    pub fn from_lookup(
        service: &str,
        default_filter: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Options {
        let set = |k: &str| {
            var(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let disabled = set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let traces_endpoint = if disabled {
            None
        } else {
            set(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).or_else(|| {
                set(OTEL_EXPORTER_OTLP_ENDPOINT)
                    .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
            })
        };
        Options {
            service_name: set(OTEL_SERVICE_NAME).unwrap_or_else(|| service.to_owned()),
            traces_endpoint,
            default_filter: default_filter.to_owned(),
            export_filter: EXPORT_FILTER.to_owned(),
            stderr: false,
        }
    }

    /// Log lines to standard error.
    pub fn stderr(mut self) -> Self {
        self.stderr = true;
        self
    }
}

/// Why [`init`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// `RUST_LOG` (or the default filter) does not parse.
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built (a bad endpoint URL, named in the message).
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter {
        /// The traces endpoint.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the exporter alive; dropping it flushes the spans still queued (call it last, at the
/// end of `main`).
#[must_use = "dropping the guard stops the export"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every span ended so far, now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Bounded: a collector that is down must not hold the process's exit for long.
            let _ = p.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

fn filter(default: &str) -> Result<EnvFilter, InitError> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(default),
    }
    .map_err(|e| InitError::Filter(e.to_string()))
}

/// Installs the global subscriber described by `options`.
pub fn init(options: Options) -> Result<Guard, InitError> {
    let writer = if options.stderr {
        BoxMakeWriter::new(std::io::stderr)
    } else {
        BoxMakeWriter::new(std::io::stdout)
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_filter(filter(&options.default_filter)?);
    let Some(endpoint) = options.traces_endpoint else {
        tracing_subscriber::registry()
            .with(fmt)
            .try_init()
            .map_err(|_| InitError::AlreadyInstalled)?;
        return Ok(Guard { provider: None });
    };
    let export_filter = EnvFilter::try_new(&options.export_filter)
        .map_err(|e| InitError::Filter(format!("export filter: {e}")))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| InitError::Exporter {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?;
    // The batch processor exports from its own thread (interval: OTEL_BSP_SCHEDULE_DELAY,
    // default 5 s), so a slow collector never sits in a request's or a publish's path.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(options.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer(options.service_name);
    tracing_subscriber::registry()
        .with(fmt)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(export_filter),
        )
        .try_init()
        .map_err(|_| InitError::AlreadyInstalled)?;
    Ok(Guard {
        provider: Some(provider),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(vars: &[(&str, &str)]) -> Options {
        Options::from_lookup("svc", "info", |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert_eq!(opts(&[]).traces_endpoint, None);
        assert_eq!(
            opts(&[(OTEL_EXPORTER_OTLP_ENDPOINT, " ")]).traces_endpoint,
            None
        );
        assert_eq!(opts(&[]).service_name, "svc");
    }

    #[test]
    fn the_base_endpoint_gets_the_traces_path_and_the_traces_endpoint_is_verbatim() {
        let o = opts(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://127.0.0.1:4318/"),
            (OTEL_SERVICE_NAME, "relay-a"),
        ]);
        assert_eq!(
            o.traces_endpoint.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(o.service_name, "relay-a");
        let o = opts(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://a:4318"),
            (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://b:9/x"),
        ]);
        assert_eq!(o.traces_endpoint.as_deref(), Some("http://b:9/x"));
    }

    #[test]
    fn the_sdk_switch_turns_export_off() {
        let o = opts(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://a:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert_eq!(o.traces_endpoint, None);
    }
}
