//! The integration test binary: one binary keeps link time down on a small machine. Each
//! module tests one capability end to end over real TCP on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod access;
mod admin;
mod cli;
mod client_recipes;
mod confinement;
mod connect_http;
mod consent;
mod credentials_login;
mod credentials_oauth2;
mod credentials_outreach;
mod credentials_outseta;
mod docs;
mod hostile;
mod hostile_admin;
mod hostile_vendors;
mod https;
mod identities;
mod layers;
mod mtls;
mod pipeline;
mod props;
mod proxy_basics;
mod raw;
mod redirects;
mod reload;
mod replicas;
mod secret_commands;
mod signing;
mod soak;
mod streaming;
mod token_admin;
mod token_parsing_props;
mod unauthorized;
mod upstream_pool;
mod websocket;
