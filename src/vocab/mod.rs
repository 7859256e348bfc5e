//! The vocabulary every other layer is written in: config values (durations, sizes, `${VAR}`),
//! secrets and their redaction, the validation context, host patterns and upstream targets,
//! the hop-by-hop header list and the shutdown signal. Nothing here imports a module of the
//! crate outside `vocab`, so every layer above can use it without an import circle.

pub mod client_cert;
pub mod hop_by_hop;
pub mod hosts;
pub mod redact;
pub mod secret;
pub mod secret_command;
pub mod shutdown;
pub mod validate_ctx;
pub mod values;
