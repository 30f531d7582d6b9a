//! The fault suite's consumer lives in `src/bin/fault-consumer.rs`; the suite itself in
//! `tests/faults.rs`.
