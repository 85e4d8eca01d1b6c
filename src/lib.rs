//! # sandgate
//!
//! A TLS gateway that admits clients to services inside sandboxes with short-lived, signed
//! connect tokens.
//!
//! # Layout
//!
//! - [`config`]: raw TOML structs (unknown keys rejected) → a validated [`config::Config`].
//! - [`tls`]: rustls server config, dev certificates (rcgen), a reloadable certificate resolver.
//! - [`token`]: connect-token claims, signing keys, issue and verify with a verified-token cache
//!   and the revocation set. Pure domain: no HTTP types.
//! - [`credential`]: API keys: generation, hashing, scopes.
//! - [`store`]: the [`store::Store`] trait, the embedded SQLite implementation and the
//!   PostgreSQL one for cluster mode (keys sealed under a KEK, a LISTEN/NOTIFY change feed).
//! - [`cluster`]: applies other nodes' changes to this node's memory; heartbeats, lost nodes.
//! - [`front`]: per-thread, epoch-guarded front caches for the tables every request reads.
//! - [`sandbox`]: the sandbox model and the in-memory route table the data plane reads;
//!   `sandbox::process` runs `command` sandboxes, isolated by `sandbox::isolate` with its
//!   parts: `launch` (the re-executed launcher, PID 1 and exec), `spec`, `mount` (the root
//!   filesystem), `seccomp` (the system call filter and the emptied capability bounding set
//!   its commands run under), `netns` (sockets inside a sandbox's network namespace), `cgroup` (limits and
//!   total ends, v1 and v2), `egress` (the in-namespace egress proxy), `volume` (named
//!   volumes on disk: confined sub-paths, sizes, whose uid their files are), `image`
//!   (`docker save` archives unpacked into root filesystems, never following a link), `files`
//!   (file operations done as the sandbox's user, in its view).
//! - [`gateway`]: opens everything from a config (store, keys, certs, admin key) into shared state.
//! - [`server`]: listeners, one single-threaded runtime per core, TLS accept, HTTP/1.1 + HTTP/2
//!   serving, graceful shutdown.
//! - [`proxy`]: the data plane: route → authenticate → forward; [`proxy::upstream`] is the
//!   upstream policy (which addresses an `upstream` sandbox may be), checked at every connect.
//! - [`api`]: the control plane (axum) on the base domain; `api/volume.rs` serves `/v1/volumes`,
//!   `api/image.rs` `/v1/images`.
//! - [`error`]: the one place gateway errors become HTTP responses.
//! - [`telemetry`]: tracing set-up and Prometheus metrics.
//! - [`tracker`]: which connections each token and sandbox opened, so revocation closes them.
//! - [`client`]: the HTTPS client the CLI's client commands use.

pub mod api;
pub mod client;
pub mod cluster;
pub mod config;
pub mod credential;
pub mod error;
pub mod front;
pub mod gateway;
pub mod proxy;
pub mod relay;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod tracker;

/// Seconds since the Unix epoch: the one clock the domain modules use.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
