//! Sandboxes as the data plane sees them: the in-memory route table.
//!
//! The proxy's hot path reads only this table (a `DashMap` keyed by sandbox id), never the
//! store. The control plane keeps it in step with the store: every create, terminate and
//! restart-time load goes through [`Routes::upsert`] or [`Routes::remove`].

pub mod cgroup;
pub mod egress;
pub mod files;
pub mod image;
pub mod isolate;
pub mod launch;
pub mod mount;
pub mod netns;
pub mod process;
pub mod seccomp;
pub mod snapshot;
pub mod spec;
pub mod volume;

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use http::uri::Authority;
use http::HeaderValue;
use rand::Rng;

use crate::front::{Epoch, Front};
use crate::sandbox::netns::NetNs;
use crate::store::{SandboxRecord, SandboxStatus};
use crate::unix_now;

/// Length of a sandbox id: 24 characters of `[a-z0-9]` carry 124 bits of randomness.
pub const ID_LEN: usize = 24;

/// A new unguessable, DNS-label-safe sandbox id.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// True for strings shaped like sandbox ids (lowercase letters and digits, 20–64 chars).
pub fn is_valid_id(id: &str) -> bool {
    (20..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The host part of an isolated sandbox's upstream authority: `<id>.netns.invalid`.
pub const NETNS_SUFFIX: &str = ".netns.invalid";

/// Where one published port's traffic goes.
#[derive(Debug, Clone)]
pub struct PortTarget {
    /// The port as it appears in URLs and tokens.
    pub published: u16,
    /// `host:port` of the service, used for the upstream URI.
    pub authority: Authority,
    /// The same as a `Host` value, for sandboxes created with `rewrite_host`.
    pub host_header: HeaderValue,
}

/// One sandbox's routing entry.
#[derive(Debug, Clone)]
pub struct Route {
    pub id: String,
    pub owner: String,
    /// False once the sandbox has ended: its tokens answer 410.
    pub live: bool,
    pub ports: Vec<PortTarget>,
    /// Origins allowed to use a cookie session cross-origin, and to pass CORS preflights.
    pub cors_origins: Vec<String>,
    pub rewrite_host: bool,
    /// When an `upstream` sandbox times out (process sandboxes are ended by their driver).
    pub upstream_deadline: Option<i64>,
    /// An `upstream` sandbox: its address came from an API caller, so every connection to it
    /// is held to the upstream policy. Process sandboxes' addresses are the orchestrator's own.
    pub policed: bool,
    /// The node that runs an isolated sandbox: another node reaches it through the cluster
    /// relay ([`crate::relay`]).
    pub node: Option<String>,
    /// Still `starting`: its idle clock has not started.
    pub starting: bool,
    /// A `command` sandbox's `idle_timeout_secs`.
    pub idle_timeout: Option<u64>,
    /// When it last served a request, held a connection or ran an exec. One `Arc` for every thread's copy of the
    /// route, and kept across [`Routes::upsert`], so no thread's activity is lost.
    pub activity: Arc<Activity>,
}

/// When a sandbox was last active, in unix seconds.
///
/// Written on the request path, so a write happens only when the second has changed: a
/// sandbox busy on every core costs each request a relaxed load of a line that stays shared
/// in every core's cache, and one store per second.
#[derive(Debug)]
pub struct Activity(AtomicI64);

impl Activity {
    pub fn new(now: i64) -> Activity {
        Activity(AtomicI64::new(now))
    }

    /// True when nothing was noted for `timeout` seconds up to `now`.
    pub fn quiet_for(&self, timeout: u64, now: i64) -> bool {
        u64::try_from(now.saturating_sub(self.last())).unwrap_or(0) >= timeout
    }

    /// Notes activity at `now` (unix seconds, such as the request path's [`unix_now`]).
    #[inline]
    pub fn touch(&self, now: i64) {
        if self.0.load(Ordering::Relaxed) < now {
            self.0.store(now, Ordering::Relaxed);
        }
    }

    /// The last second with activity.
    pub fn last(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Route {
    /// Builds the entry for a stored sandbox. `None` when the record names no reachable
    /// address (a process sandbox whose ports were never mapped).
    pub fn from_record(record: &SandboxRecord) -> Option<Route> {
        let mut ports = Vec::with_capacity(record.ports.len());
        // An isolated sandbox's ports are inside its network namespace: the connector knows
        // them by the reserved name `<id>.netns.invalid` (never resolvable), which also keeps
        // each sandbox's pooled connections apart.
        let isolated = record.process.isolation.as_deref() == Some("namespaces");
        for &published in &record.ports {
            if isolated {
                let authority: Authority = format!("{}{NETNS_SUFFIX}:{published}", record.id)
                    .parse()
                    .ok()?;
                let host_header = HeaderValue::from_str(&format!("127.0.0.1:{published}")).ok()?;
                ports.push(PortTarget {
                    published,
                    authority,
                    host_header,
                });
                continue;
            }
            let (host, port) = match (&record.upstream, record.host_ports.get(&published)) {
                // A process sandbox: on its node's advertised address in cluster mode.
                (upstream, Some(&host_port)) => {
                    (upstream.as_deref().unwrap_or("127.0.0.1"), host_port)
                }
                (Some(upstream), None) => (upstream.as_str(), published),
                (None, None) => return None,
            };
            let text = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let authority: Authority = text.parse().ok()?;
            let host_header = HeaderValue::from_str(&text).ok()?;
            ports.push(PortTarget {
                published,
                authority,
                host_header,
            });
        }
        Some(Route {
            id: record.id.clone(),
            owner: record.owner.clone(),
            live: matches!(
                record.status,
                SandboxStatus::Starting | SandboxStatus::Running
            ),
            ports,
            cors_origins: record.cors_origins.clone(),
            rewrite_host: record.rewrite_host,
            upstream_deadline: record.expires_at.filter(|_| record.command.is_none()),
            policed: record.command.is_none(),
            node: record.node.clone().filter(|_| isolated),
            starting: record.status == SandboxStatus::Starting,
            idle_timeout: record
                .process
                .idle_timeout_secs
                .filter(|_| record.command.is_some()),
            activity: Arc::new(Activity::new(unix_now())),
        })
    }

    /// The target of a published port; `None` for a port the sandbox does not publish.
    pub fn port(&self, published: u16) -> Option<&PortTarget> {
        self.ports.iter().find(|p| p.published == published)
    }

    /// True when `origin` (as sent by a browser) is listed for this sandbox.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.cors_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// The route table: sandbox id → route.
#[derive(Debug, Default)]
pub struct Routes {
    map: DashMap<String, Arc<Route>, foldhash::fast::RandomState>,
    /// Bumped after every change: guards each thread's front copy (see [`crate::front`]).
    epoch: Epoch,
    /// Network namespaces of this node's isolated sandboxes, by id: where the connector makes
    /// their upstream sockets. Read per new upstream connection, never per request.
    netns: DashMap<String, Arc<NetNs>, foldhash::fast::RandomState>,
}

thread_local! {
    /// This thread's copies of the routes it served lately.
    static ROUTES: RefCell<Front<Arc<Route>>> = RefCell::new(Front::default());
}

impl Routes {
    pub fn new() -> Routes {
        Routes::default()
    }

    /// The route of sandbox `id`, from this thread's front copy when nothing changed since.
    pub fn get(&self, id: &str) -> Option<Arc<Route>> {
        let seen = self.epoch.current();
        if let Some(route) = Front::get(&ROUTES, &self.epoch, seen, id) {
            return Some(route);
        }
        // A copy of its own, so this thread's hits touch no shared reference count.
        let route = Arc::new(Route::clone(self.map.get(id)?.value()));
        Front::put(&ROUTES, &self.epoch, seen, id, Arc::clone(&route));
        Some(route)
    }

    /// Inserts or replaces the entry for a record. A sandbox's activity carries over from its
    /// previous entry, and its idle clock starts again when it stops `starting`.
    pub fn upsert(&self, record: &SandboxRecord) {
        match Route::from_record(record) {
            Some(mut route) => {
                let previous = self
                    .map
                    .get(&record.id)
                    .map(|r| (Arc::clone(&r.activity), r.starting));
                if let Some((activity, was_starting)) = previous {
                    route.activity = activity;
                    if was_starting && !route.starting {
                        route.activity.touch(unix_now());
                    }
                }
                self.map.insert(record.id.clone(), Arc::new(route));
            }
            None => {
                self.map.remove(&record.id);
            }
        }
        self.epoch.bump();
    }

    /// Ids of live `upstream` sandboxes whose deadline has passed.
    pub fn overdue(&self, now: i64) -> Vec<String> {
        self.map
            .iter()
            .filter(|r| r.live && r.upstream_deadline.is_some_and(|t| t <= now))
            .map(|r| r.key().clone())
            .collect()
    }

    /// Notes activity in sandbox `id` now (an exec, a file operation). The request path
    /// touches the route it already holds instead.
    pub fn touch(&self, id: &str) {
        if let Some(route) = self.map.get(id) {
            route.activity.touch(unix_now());
        }
    }

    /// Running sandboxes with an idle timeout: id, timeout and activity. Whether one is idle
    /// (its activity older than the timeout, and no open connection or exec) is the caller's
    /// to decide.
    pub fn idle_timed(&self) -> Vec<(String, u64, Arc<Activity>)> {
        self.map
            .iter()
            .filter(|r| r.live && !r.starting)
            .filter_map(|r| {
                let timeout = r.idle_timeout?;
                Some((r.key().clone(), timeout, Arc::clone(&r.activity)))
            })
            .collect()
    }

    /// Every sandbox id in the table.
    pub fn ids(&self) -> Vec<String> {
        self.map.iter().map(|r| r.key().clone()).collect()
    }

    /// Makes an isolated sandbox's namespace reachable by the connector.
    pub fn attach_netns(&self, id: &str, netns: Arc<NetNs>) {
        self.netns.insert(id.to_string(), netns);
    }

    /// Forgets it (the sandbox ended): new connections to it fail.
    pub fn detach_netns(&self, id: &str) {
        self.netns.remove(id);
    }

    /// The namespace of isolated sandbox `id` on this node.
    pub fn netns(&self, id: &str) -> Option<Arc<NetNs>> {
        self.netns.get(id).map(|n| Arc::clone(n.value()))
    }

    pub fn remove(&self, id: &str) {
        self.map.remove(id);
        self.epoch.bump();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn record(upstream: Option<&str>) -> SandboxRecord {
        SandboxRecord {
            id: new_id(),
            owner: "cred_x".into(),
            status: SandboxStatus::Running,
            ports: vec![8000, 9000],
            upstream: upstream.map(str::to_string),
            command: None,
            env: BTreeMap::new(),
            cors_origins: vec!["https://app.example.com".into()],
            rewrite_host: false,
            metadata: serde_json::json!({}),
            created_at: 0,
            expires_at: None,
            ended_at: None,
            host_ports: BTreeMap::new(),
            node: None,
            detail: None,
            process: Default::default(),
            name: None,
            tags: BTreeMap::new(),
            secret_env: BTreeMap::new(),
        }
    }

    /// The sandboxes quiet for their timeout at `now`.
    fn idle(routes: &Routes, now: i64) -> Vec<(String, u64)> {
        routes
            .idle_timed()
            .into_iter()
            .filter(|(_, timeout, activity)| activity.quiet_for(*timeout, now))
            .map(|(id, timeout, _)| (id, timeout))
            .collect()
    }

    #[test]
    fn activity_outlives_record_changes_and_idle_waits_for_running() {
        let routes = Routes::new();
        let mut r = record(None);
        r.command = Some(vec!["server".into()]);
        r.host_ports = BTreeMap::from([(8000, 41000), (9000, 41001)]);
        r.process.idle_timeout_secs = Some(3);
        r.status = SandboxStatus::Starting;
        routes.upsert(&r);
        let now = unix_now();
        // Starting: never idle, however long ago its last activity.
        assert!(idle(&routes, now + 100).is_empty());
        let copy = routes.get(&r.id).unwrap();
        r.status = SandboxStatus::Running;
        routes.upsert(&r);
        // The clock started when it became running; a thread's old copy shares the activity.
        assert!(idle(&routes, now + 2).is_empty());
        assert_eq!(idle(&routes, now + 4), vec![(r.id.clone(), 3)]);
        copy.activity.touch(now + 10);
        r.detail = Some("a changed record".into());
        routes.upsert(&r);
        assert!(idle(&routes, now + 12).is_empty());
        assert_eq!(idle(&routes, now + 13).len(), 1);
        assert!(Arc::ptr_eq(
            &routes.get(&r.id).unwrap().activity,
            &copy.activity
        ));
        // Touching never moves the clock back.
        copy.activity.touch(now);
        assert_eq!(copy.activity.last(), now + 10);
        // Ended, or without a timeout: never idle.
        r.status = SandboxStatus::Stopped;
        routes.upsert(&r);
        assert!(idle(&routes, now + 100).is_empty());
        let mut other = record(Some("10.0.3.7"));
        other.process.idle_timeout_secs = Some(3);
        routes.upsert(&other);
        assert!(
            idle(&routes, now + 100).is_empty(),
            "upstream sandboxes are not ended"
        );
    }

    #[test]
    fn ids_are_dns_safe_and_distinct() {
        let a = new_id();
        assert!(is_valid_id(&a));
        assert_ne!(a, new_id());
        assert!(!is_valid_id("short"));
        assert!(!is_valid_id("ABCDEFGHIJKLMNOPQRSTUVWX"));
        assert!(!is_valid_id("abcdefghij-klmnopqrstuvwx"));
    }

    #[test]
    fn upstream_and_process_targets() {
        let r = Route::from_record(&record(Some("10.0.3.7"))).unwrap();
        assert_eq!(r.port(8000).unwrap().authority.as_str(), "10.0.3.7:8000");
        assert!(r.policed);
        assert!(r.port(8001).is_none());
        let r = Route::from_record(&record(Some("::1"))).unwrap();
        assert_eq!(r.port(9000).unwrap().authority.as_str(), "[::1]:9000");
        let mut p = record(None);
        p.host_ports = BTreeMap::from([(8000, 41000), (9000, 41001)]);
        p.command = Some(vec!["server".into()]);
        let r = Route::from_record(&p).unwrap();
        assert_eq!(r.port(9000).unwrap().authority.as_str(), "127.0.0.1:41001");
        assert!(!r.policed);
        assert!(Route::from_record(&record(None)).is_none());
        assert!(r.allows_origin("https://APP.example.com"));
        assert!(!r.allows_origin("https://evil.example.com"));
    }
}
