//! In-process servers that behave like each vendor's token endpoints and APIs.

pub mod login;
pub mod oauth2;
pub mod outreach;
pub mod outseta;

/// A test fixture file's absolute path (keys under `tests/it/fixtures`).
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures")
        .join(name)
}

/// A test fixture file's content.
pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}
