//! Why an exchange with an upstream failed, and how an error chain is read: described on one
//! line without a URL, or searched for a cause of a given type.

use std::time::Duration;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No response head within the configured time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connect, TLS or protocol failure; the text is safe to show (no URL query).
    #[error("{0}")]
    Failed(String),
    /// The client's request body, streamed upstream, sent nothing for this long.
    #[error("the request body sent nothing for {0:?}")]
    ClientBodyStalled(Duration),
    /// The client's request body, streamed upstream, could not be read (bad chunk framing,
    /// the client went away).
    #[error("{0}")]
    ClientBody(String),
}

/// A client's request body could not be read while it was being sent: the client's fault,
/// not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("request body could not be read: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// The error of type `T` among `e` and its causes.
pub fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The error and its causes on one line; certificate problems read as such.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    let text = parts.join(": ");
    match refused_client_certificate(&text) {
        Some(alert) => format!(
            "the upstream refused the TLS handshake (alert {alert:?}): it wants a client \
             certificate it trusts (`tls_client_cert`); {text}"
        ),
        None => text,
    }
}

/// The alert an upstream answered a handshake with, found in an error's `description`, when
/// it is about the client's certificate: none was presented, or the one presented is not
/// trusted or not accepted (a signature that does not verify against a CA of the same name
/// is `DecryptError`). Read from the text because HTTP/2 keeps only the text of an I/O
/// error, not the TLS error itself; the text is rustls's own.
fn refused_client_certificate(description: &str) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as Alert;
    [
        Alert::CertificateRequired,
        Alert::BadCertificate,
        Alert::UnknownCA,
        Alert::CertificateUnknown,
        Alert::CertificateExpired,
        Alert::CertificateRevoked,
        Alert::UnsupportedCertificate,
        Alert::AccessDenied,
        Alert::DecryptError,
    ]
    .into_iter()
    .find(|alert| description.contains(&rustls::Error::AlertReceived(*alert).to_string()))
}

#[cfg(test)]
mod tests {
    use super::refused_client_certificate;
    use rustls::AlertDescription;

    #[test]
    fn alerts_about_the_client_certificate_are_told_from_other_failures() {
        let refused = "connection error: received fatal alert: CertificateRequired";
        assert_eq!(
            refused_client_certificate(refused),
            Some(AlertDescription::CertificateRequired)
        );
        assert_eq!(
            refused_client_certificate("received fatal alert: UnknownCA"),
            Some(AlertDescription::UnknownCA)
        );
        for other in [
            "received fatal alert: ProtocolVersion",
            "invalid peer certificate: UnknownIssuer",
            "tcp connect error: Connection refused (os error 111)",
        ] {
            assert_eq!(refused_client_certificate(other), None, "{other}");
        }
    }
}
