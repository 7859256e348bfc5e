//! A wrapper for values that must never reach logs, errors, metrics or `Debug` output.

use std::cell::Cell;
use std::fmt;

thread_local! {
    /// Set only inside [`with_revealed_debug`], on this thread, for one `format!`.
    static REVEAL: Cell<bool> = const { Cell::new(false) };
}

/// Formats `value` with `Debug` *including* its secrets and hands the text to `digest`,
/// which must reduce it to something that cannot be read back (a keyed hash): the shared
/// token cache keys a credential's tokens by a fingerprint of its whole definition, so that a
/// changed password or key never reads a token issued for the old one. The text never
/// leaves this call; the flag is per thread and cleared even if formatting panics.
pub fn with_revealed_debug<R>(value: &dyn fmt::Debug, digest: impl FnOnce(&str) -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            REVEAL.with(|r| r.set(false));
        }
    }
    REVEAL.with(|r| r.set(true));
    let reset = Reset;
    let text = format!("{value:?}");
    drop(reset);
    digest(&text)
}

/// Whether `Debug` output is being formatted for [`with_revealed_debug`]: types that hide
/// secret material print it (or a digest of it) then, and only then.
pub fn revealing() -> bool {
    REVEAL.with(Cell::get)
}

/// A secret string (password, API secret, token). `Debug` and `Display` print `***`, so a
/// secret can sit inside any struct that derives `Debug` without leaking. The value is only
/// reachable through [`Secret::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself, for building a request or header. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if revealing() {
            return fmt::Debug::fmt(&self.0, f);
        }
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Config files carry secrets (or `${VAR}` references to them): specs hold them as `Secret`
/// so that a spec printed with `Debug` shows `***`.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn revealed_debug_shows_the_value_only_inside_the_call() {
        let s = Secret::new("hunter2");
        let inside = with_revealed_debug(&s, |text| text.to_string());
        assert_eq!(inside, "\"hunter2\"");
        assert_eq!(format!("{s:?}"), "***");
        assert!(!revealing());
    }
}
