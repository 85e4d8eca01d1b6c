//! `/v1/volumes`: named folders that outlive the isolated sandboxes that mount them (see
//! [`crate::sandbox::volume`] for the layout on disk and whose files they are).
//!
//! Names are per owner; a non-admin sees only its own volumes (another owner's are 404), an
//! admin sees every owner's but, like anyone, reads and deletes by name among its own unless
//! it names the owner with `?owner=`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{created, rfc3339, ApiJson, AppState, Caller, Items};
use crate::credential::Scope;
use crate::error::HttpError;
use crate::gateway::Gateway;
use crate::sandbox::process::Driver;
use crate::sandbox::volume::valid_name;
use crate::store::VolumeRecord;
use crate::unix_now;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateVolume {
    name: String,
}

/// `?owner=` lets an admin name another owner's volume.
#[derive(Deserialize)]
pub(super) struct OwnerQuery {
    owner: Option<String>,
}

#[derive(Serialize)]
pub(super) struct VolumeView {
    name: String,
    owner: String,
    created_at: String,
    /// Apparent bytes of its files; `null` when its folder is on another node.
    size_bytes: Option<u64>,
    /// Cluster mode: the node whose disk holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

async fn view(driver: &Driver, v: &VolumeRecord) -> VolumeView {
    let here = v.node.is_none() || v.node.as_deref() == Some(driver.node());
    let size_bytes = if here {
        let (owner, name) = (v.owner.clone(), v.name.clone());
        // Safe to measure from the gateway: the walk opens every folder by descriptor
        // without following links.
        let volumes = driver.volumes_handle();
        tokio::task::spawn_blocking(move || volumes.size(&owner, &name))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    VolumeView {
        name: v.name.clone(),
        owner: v.owner.clone(),
        created_at: rfc3339(v.created_at),
        size_bytes,
        node: v.node.clone(),
    }
}

/// Volumes are this node's driver's: a gateway-only node has none.
fn driver(gw: &Gateway) -> Result<&std::sync::Arc<Driver>, HttpError> {
    gw.driver.as_ref().ok_or_else(|| {
        HttpError::invalid_argument(
            "this node runs no sandboxes ([orchestrator] enabled = false), so it keeps no volumes",
        )
    })
}

/// The node to record on a new volume: this one in cluster mode, unless `volumes_dir` is
/// shared by every node.
fn home_node(gw: &Gateway) -> Option<String> {
    (gw.config.store.url.is_some() && !gw.config.orchestrator.volumes_shared)
        .then(|| gw.config.cluster.node_name.clone())
}

fn check_name(name: &str) -> Result<(), HttpError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(HttpError::invalid_argument(
            "a volume name is 1 to 63 of a-z, 0-9 and -, such as agents",
        ))
    }
}

/// The volume `name` of the caller (or, for an admin, of `?owner=`); 404 otherwise.
async fn owned_volume(
    gw: &Gateway,
    caller: &Caller,
    name: &str,
    owner: Option<String>,
) -> Result<VolumeRecord, HttpError> {
    let owner = match owner {
        Some(o) if caller.is_admin() => o,
        _ => caller.credential.id.clone(),
    };
    gw.store
        .volume(&owner, name)
        .await?
        .ok_or_else(|| HttpError::not_found("no such volume"))
}

pub(super) async fn create_volume(
    State(gw): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateVolume>,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    check_name(&body.name)?;
    let driver = driver(&gw)?;
    let owner = caller.credential.id.clone();
    let node = home_node(&gw);
    let record = {
        let _held = driver.volumes().lock.write().await;
        if gw.store.volume(&owner, &body.name).await?.is_some() {
            return Err(HttpError::conflict(format!(
                "you already have a volume named {}",
                body.name
            )));
        }
        let uid = driver
            .volume_uid(&owner, node.as_deref())
            .await
            .map_err(super::driver_error)?;
        let record = VolumeRecord {
            owner: owner.clone(),
            name: body.name.clone(),
            created_at: unix_now(),
            node,
            uid,
        };
        let made = {
            let volumes = driver.volumes_handle();
            let (owner, name) = (owner.clone(), body.name.clone());
            tokio::task::spawn_blocking(move || volumes.make_dir(&owner, &name, uid)).await
        };
        match made {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(volume = %body.name, error = %e, "cannot make a volume's folder");
                return Err(HttpError::unavailable(format!(
                    "cannot make the volume's folder under [orchestrator] volumes_dir: {e}"
                )));
            }
            Err(_) => return Err(HttpError::internal()),
        }
        gw.store.insert_volume(&record).await?;
        record
    };
    gw.metrics.storage("volume_create", 0);
    gw.audit(
        &caller.credential.id,
        "volume.create",
        &format!("{}/{}", record.owner, record.name),
        caller.client_addr.clone(),
    )
    .await;
    Ok(created(view(driver, &record).await))
}

pub(super) async fn list_volumes(
    State(gw): State<AppState>,
    caller: Caller,
) -> Result<Json<Items<VolumeView>>, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let driver = driver(&gw)?;
    let mut items = Vec::new();
    for v in gw.store.volumes().await? {
        if caller.is_admin() || v.owner == caller.credential.id {
            items.push(view(driver, &v).await);
        }
    }
    Ok(Json(Items { items }))
}

pub(super) async fn get_volume(
    State(gw): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<OwnerQuery>,
) -> Result<Json<VolumeView>, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let driver = driver(&gw)?;
    let v = owned_volume(&gw, &caller, &name, q.owner).await?;
    Ok(Json(view(driver, &v).await))
}

pub(super) async fn delete_volume(
    State(gw): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<OwnerQuery>,
) -> Result<StatusCode, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    let driver = driver(&gw)?;
    let v = {
        let _held = driver.volumes().lock.write().await;
        let v = owned_volume(&gw, &caller, &name, q.owner).await?;
        if let Some(node) = v.node.as_deref().filter(|n| *n != driver.node()) {
            return Err(HttpError::conflict(format!(
                "volume {name} lives on node {node}: delete it through that node"
            )));
        }
        let mounted_by: Vec<String> = gw
            .store
            .sandboxes()
            .await?
            .into_iter()
            .filter(|s| {
                s.owner == v.owner
                    && s.status.is_live()
                    && s.process.volumes.iter().any(|m| m.volume == v.name)
            })
            .map(|s| s.id)
            .collect();
        if !mounted_by.is_empty() {
            return Err(HttpError::conflict(format!(
                "volume {name} is mounted by live sandbox {}: delete the sandbox first",
                mounted_by.join(", ")
            )));
        }
        let removed = {
            let volumes = driver.volumes_handle();
            let (owner, name) = (v.owner.clone(), v.name.clone());
            tokio::task::spawn_blocking(move || volumes.remove_dir(&owner, &name)).await
        };
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(volume = %v.name, owner = %v.owner, error = %e, "cannot delete a volume's folder");
                return Err(HttpError::unavailable(format!(
                    "cannot delete the volume's folder: {e}"
                )));
            }
            Err(_) => return Err(HttpError::internal()),
        }
        gw.store.delete_volume(&v.owner, &v.name).await?;
        let uid_still_used = gw
            .store
            .volumes()
            .await?
            .iter()
            .any(|other| other.uid == v.uid);
        if !uid_still_used {
            driver.release_volume_uid(v.uid);
        }
        v
    };
    gw.metrics.storage("volume_delete", 0);
    gw.audit(
        &caller.credential.id,
        "volume.delete",
        &format!("{}/{}", v.owner, v.name),
        caller.client_addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
