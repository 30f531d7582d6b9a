//! Placeholder: filled in by the prepared-messages work.
