//! Writes the fleet into the `cml_workers` registry so sync-daemon discovers it.

use std::collections::BTreeMap;

use bson::{doc, Document};
use mongodb::Client;

use crate::fleet::Fleet;

/// Upserts one `running` worker document per simulated server (by `id`); returns how many.
pub async fn write_registry(
    client: &Client,
    database: &str,
    collection: &str,
    fleet: &Fleet,
    endpoints: &BTreeMap<String, String>,
) -> mongodb::error::Result<usize> {
    let coll = client.database(database).collection::<Document>(collection);
    for (i, w) in fleet.workers.iter().enumerate() {
        let endpoint = endpoints.get(&w.id).cloned().unwrap_or_default();
        coll.update_one(
            doc! { "id": &w.id },
            doc! { "$set": {
                "id": &w.id, "name": &w.name, "aws_region": &w.aws_region,
                "aws_instance_id": format!("i-{:017x}", i), "instance_type": "c5.2xlarge",
                "status": "running", "service_status": "available",
                "https_endpoint": endpoint, "public_ip": "127.0.0.1", "private_ip": "127.0.0.1",
            } },
        )
        .upsert(true)
        .await?;
    }
    Ok(fleet.workers.len())
}
