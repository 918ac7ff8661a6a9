//! The daemon as a service: built from its configuration (MongoDB, CML client, the admin port
//! bound), then run until shutdown.

use std::{net::SocketAddr, sync::Arc};

use shared::{config::Config, service::HttpListener};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    daemon,
    logs::{Lifecycle, LogLine},
    Error, Result,
};

/// A built daemon: its context and its admin port (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug)]
pub struct App {
    ctx: Arc<Context>,
    admin: HttpListener,
    instance: String,
}

impl App {
    /// Connects (lazily) to MongoDB, builds the clients and binds `sync.admin_listen` (port 0
    /// picks a free port: see [`App::local_addr`]). `instance` names this replica in the lease.
    pub async fn build(config: Config, instance: &str) -> Result<Self> {
        Self::new(Context::build(config, instance).await?, instance).await
    }

    /// The service around a context built by the caller; binds the admin port.
    pub async fn new(ctx: Arc<Context>, instance: &str) -> Result<Self> {
        let addr = ctx.config.sync.admin_listen.clone();
        let admin = HttpListener::bind(&addr, "admin")
            .await
            .map_err(|source| Error::AdminListen { addr, source })?;
        Ok(Self {
            ctx,
            admin,
            instance: instance.to_owned(),
        })
    }

    /// Where the admin endpoints answer.
    pub fn local_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Syncs until `shutdown`, then drains. The admin port answers until the daemon stopped.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let ctx = self.ctx;
        Lifecycle::Starting {
            instance: &self.instance,
        }
        .emit(&ctx.metrics);
        let probes = shared::service::probes(ctx.db.clone(), ctx.metrics.registry.clone());
        let admin_stop = CancellationToken::new();
        let limits = ctx.config.sync.admin_limits();
        let admin = tokio::spawn(self.admin.serve(probes, limits, admin_stop.clone()));
        let result = daemon::run(ctx, shutdown).await;
        admin_stop.cancel();
        let served = match admin.await {
            Ok(r) => r.map_err(Error::AdminServe),
            Err(e) => Err(Error::AdminServe(std::io::Error::other(e))),
        };
        result.and(served)
    }
}

/// This replica's name in the lease: the pod name (HOSTNAME) plus a random suffix.
pub fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "sync-daemon".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}
