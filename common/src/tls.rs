//! TLS for the clients a Stitch process opens: webhook deliveries, the OTLP trace exporter.
//!
//! The workspace builds rustls without a default crypto provider (ring is chosen, instead of
//! building aws-lc), so every program must install one before any client exists: reqwest
//! panics otherwise, and the OTLP exporter, which builds its client on a thread of its own,
//! fails with "thread creating the blocking HTTP client panicked" and exports nothing.

/// Chooses ring as rustls's crypto provider for this process. Call it first thing in `main`;
/// later calls change nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
