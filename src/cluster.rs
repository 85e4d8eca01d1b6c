//! Keeping one node's in-memory views in step with the shared store: the route table, the
//! revocation set and the signing keys. Also the node's heartbeat, and declaring silent nodes
//! lost.
//!
//! Every write another node makes is announced by the store's change feed
//! ([`crate::store::Store::changes`]): PostgreSQL's LISTEN/NOTIFY in cluster mode, an in-process feed for
//! SQLite. [`run`] applies each change as it arrives, so a revocation on any node closes the
//! connections it covers on every node within the notification's latency. When the feed was
//! interrupted (a lost database connection, or a receiver that fell behind) it reloads
//! everything, since changes may have been missed; meanwhile the data plane keeps serving
//! from memory.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::store::{Change, NodeRecord, StoreError};
use crate::unix_now;

/// Applies the change feed, heartbeats and watches the other nodes until `stop`.
pub async fn run(gw: Arc<Gateway>, stop: CancellationToken) {
    let feed = {
        let gw = Arc::clone(&gw);
        let stop = stop.clone();
        async move { follow_changes(&gw, &stop).await }
    };
    let heartbeat = async {
        let mut tick = tokio::time::interval(gw.config.cluster.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(err) = heartbeat_once(&gw).await {
                tracing::warn!(error = %err, "heartbeat failed");
            }
            if let Err(err) = find_lost_nodes(&gw).await {
                tracing::warn!(error = %err, "could not check the other nodes' heartbeats");
            }
        }
    };
    tokio::join!(feed, heartbeat);
}

/// This node's announcement.
pub fn this_node(gw: &Gateway) -> NodeRecord {
    let c = &gw.config.cluster;
    NodeRecord {
        name: c.node_name.clone(),
        advertise_addr: c.advertise_addr.clone(),
        runs_sandboxes: gw.driver.is_some(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: gw.started_at,
        last_heartbeat: unix_now(),
        relay_addr: gw.relay.advertised(),
    }
}

/// Records that this node is alive.
pub async fn heartbeat_once(gw: &Gateway) -> Result<(), StoreError> {
    gw.store.heartbeat(&this_node(gw)).await
}

/// Declares lost every other node that runs sandboxes and has been silent for
/// [`crate::config::ClusterConfig::lost_after`]. Every node checks; the store lets only one
/// transition happen per node, and the change feed tells every node about the sandboxes.
async fn find_lost_nodes(gw: &Gateway) -> Result<(), StoreError> {
    let now = unix_now();
    let lost_after = i64::try_from(gw.config.cluster.lost_after().as_secs()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(lost_after);
    let nodes = gw.store.nodes().await?;
    gw.relay.learn(&nodes);
    for node in nodes {
        if node.name == gw.config.cluster.node_name || node.last_heartbeat >= cutoff {
            continue;
        }
        let ended = gw.store.mark_node_lost(&node.name, cutoff, now).await?;
        if !ended.is_empty() {
            tracing::warn!(
                node = %node.name,
                sandboxes = ended.len(),
                "a node stopped answering: its sandboxes are lost"
            );
            for id in &ended {
                gw.audit("sandgate", "sandbox.lost", id, None).await;
            }
        }
    }
    Ok(())
}

async fn follow_changes(gw: &Arc<Gateway>, stop: &CancellationToken) {
    // Only a shared store has changes made elsewhere; the embedded one's feed repeats ours.
    let shared = gw.config.store.url.is_some();
    let Some(mut rx) = gw.store.changes().filter(|_| shared) else {
        stop.cancelled().await;
        return;
    };
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            c = rx.recv() => c,
        };
        let change = match change {
            Ok(c) => c,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "fell behind the change feed; reloading");
                Change::Resync
            }
            Err(RecvError::Closed) => {
                tracing::error!("the change feed closed; changes from other nodes stop here");
                stop.cancelled().await;
                return;
            }
        };
        // A failure (the database down again) leaves the view as it was; the feed says
        // `Resync` once the connection is back, which retries everything.
        if let Err(err) = apply(gw, &change).await {
            tracing::warn!(error = %err, ?change, "could not apply a change; will catch up on resync");
        }
    }
}

/// Brings this node's memory in line with one change.
pub async fn apply(gw: &Gateway, change: &Change) -> Result<(), StoreError> {
    match change {
        Change::TokenRevoked { jti, exp } => {
            gw.tokens.revoke(jti, *exp);
            let closed = gw.tracker.close_token(jti);
            tracing::debug!(closed, "token revoked elsewhere");
        }
        Change::SandboxChanged { id } => match gw.store.sandbox(id).await? {
            Some(record) => {
                gw.routes.upsert(&record);
                if !record.status.is_live() {
                    gw.tracker.close_sandbox(id);
                    end_if_running_here(gw, id);
                }
            }
            None => {
                gw.routes.remove(id);
                gw.tracker.close_sandbox(id);
            }
        },
        // Credentials are read from the store on every API call: nothing is cached to drop.
        Change::CredentialRevoked { .. } => {}
        Change::NodeChanged { .. } => gw.relay.learn(&gw.store.nodes().await?),
        Change::SigningKeyAdded { .. } => {
            gw.reload_keys()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string().into()))?;
        }
        Change::Resync => resync(gw).await?,
    }
    Ok(())
}

/// A sandbox this node runs was ended through another node: end its processes here too. In
/// the background, so the feed goes on while it gets its grace period.
fn end_if_running_here(gw: &Gateway, id: &str) {
    if let Some(driver) = &gw.driver {
        if driver.is_running(id) {
            let (driver, id) = (Arc::clone(driver), id.to_string());
            tokio::spawn(async move {
                driver.terminate(&id).await;
            });
        }
    }
}

/// Reloads everything a missed change could have touched.
async fn resync(gw: &Gateway) -> Result<(), StoreError> {
    let now = unix_now();
    for (jti, exp) in gw.store.revoked_tokens(now).await? {
        if !gw.tokens.is_revoked(&jti) {
            gw.tokens.revoke(&jti, exp);
            gw.tracker.close_token(&jti);
        }
    }
    for (jti, exp) in gw.store.used_tokens(now).await? {
        gw.tokens.mark_used(&jti, exp);
    }
    let records = gw.store.sandboxes().await?;
    let known: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    for id in gw.routes.ids() {
        if !known.contains(id.as_str()) {
            gw.routes.remove(&id);
            gw.tracker.close_sandbox(&id);
        }
    }
    for record in &records {
        let was_live = gw.routes.get(&record.id).is_some_and(|r| r.live);
        gw.routes.upsert(record);
        if was_live && !record.status.is_live() {
            gw.tracker.close_sandbox(&record.id);
        }
        if !record.status.is_live() {
            end_if_running_here(gw, &record.id);
        }
    }
    gw.relay.learn(&gw.store.nodes().await?);
    gw.reload_keys()
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string().into()))?;
    tracing::info!(sandboxes = records.len(), "caught up with the shared store");
    Ok(())
}

/// A node's status as `GET /v1/nodes` shows it.
pub fn node_status(gw: &Gateway, node: &NodeRecord, now: i64) -> &'static str {
    let lost_after = i64::try_from(gw.config.cluster.lost_after().as_secs()).unwrap_or(i64::MAX);
    if node.last_heartbeat < now.saturating_sub(lost_after) {
        "lost"
    } else {
        "up"
    }
}
