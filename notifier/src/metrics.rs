//! Metric names (Prometheus). Recorded with the `metrics` facade; the binary installs the
//! exporter.

/// Attempts, labelled `outcome` = `delivered` | `failed`.
pub const ATTEMPTS_TOTAL: &str = "notifier_attempts_total";
/// Notifications given up after their schedule.
pub const EXHAUSTED_TOTAL: &str = "notifier_exhausted_total";
/// Attempt latency.
pub const ATTEMPT_SECONDS: &str = "notifier_attempt_duration_seconds";
/// Claims or records that failed on the database.
pub const DATABASE_ERRORS_TOTAL: &str = "notifier_database_errors_total";
