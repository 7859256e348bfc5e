//! The integration test binary: one binary keeps link time down on a small machine. Each
//! module tests one capability end to end over real TCP on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod admin;
mod cli;
mod credentials_login;
mod credentials_oauth2;
mod credentials_outreach;
mod credentials_outseta;
mod hostile;
mod https;
mod props;
mod proxy_basics;
mod raw;
mod reload;
mod soak;
mod streaming;
mod upstream_pool;
