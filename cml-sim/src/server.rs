//! Serving the fleet on loopback: one port per worker or one port with `/w/<id>` prefixes,
//! plain HTTP or TLS, and connection-level faults (reset).

#![allow(unsafe_code)] // setsockopt(SO_LINGER) on a socket we own, to reset a connection

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{body::Body, http::Request, Router};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Notify, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::{api, fleet::Fleet, model::SimWorker};

/// How workers are addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Addressing {
    /// `http(s)://127.0.0.1:<port of the worker>`
    Ports,
    /// `http(s)://127.0.0.1:<one port>/w/<worker id>/`
    Prefix,
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: IpAddr,
    pub addressing: Addressing,
    /// The port of prefix addressing (0: any free port). Ports addressing always picks free ports.
    pub port: u16,
    /// Serve HTTPS with a certificate generated now; its CA is written to `state_dir/ca.pem`.
    pub tls: bool,
    pub state_dir: Option<PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            addressing: Addressing::Ports,
            port: 0,
            tls: false,
            state_dir: None,
        }
    }
}

/// Lets a handler reset the connection it is answering on.
#[derive(Debug, Clone, Default)]
pub struct ConnControl(Arc<Notify>);

impl ConnControl {
    pub fn reset(&self) {
        self.0.notify_one();
    }
}

/// A fleet being served. Dropping it stops every listener and connection.
#[derive(Debug)]
pub struct RunningFleet {
    pub fleet: Arc<Fleet>,
    /// Worker id → endpoint URL (what `https_endpoint` of the registry holds).
    pub endpoints: BTreeMap<String, String>,
    /// PEM of the CA that signed the server certificate (TLS only).
    pub ca_pem: Option<String>,
    pub ca_path: Option<PathBuf>,
    tasks: JoinSet<()>,
}

impl RunningFleet {
    pub fn endpoint(&self, worker_id: &str) -> &str {
        self.endpoints
            .get(worker_id)
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn shutdown(&mut self) {
        self.tasks.abort_all();
    }

    /// Writes this fleet into `database.collection` of a worker registry (see
    /// [`crate::registry::write_registry`]); returns how many workers.
    pub async fn register(
        &self,
        client: &mongodb::Client,
        database: &str,
        collection: &str,
    ) -> mongodb::error::Result<usize> {
        crate::registry::write_registry(client, database, collection, &self.fleet, &self.endpoints)
            .await
    }
}

impl Drop for RunningFleet {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

pub async fn serve(fleet: Arc<Fleet>, opts: &ServeOptions) -> std::io::Result<RunningFleet> {
    let (acceptor, ca_pem) = if opts.tls {
        let (acceptor, ca) = crate::tls::acceptor()?;
        (Some(acceptor), Some(ca))
    } else {
        (None, None)
    };
    let ca_path = match (&ca_pem, &opts.state_dir) {
        (Some(pem), Some(dir)) => Some(write_file(dir, "ca.pem", pem)?),
        _ => None,
    };
    let scheme = if opts.tls { "https" } else { "http" };
    let api = api::router(fleet.clone());
    let mut tasks = JoinSet::new();
    let mut endpoints = BTreeMap::new();
    match opts.addressing {
        Addressing::Ports => {
            for worker in &fleet.workers {
                let listener = TcpListener::bind(SocketAddr::new(opts.host, 0)).await?;
                let addr = listener.local_addr()?;
                endpoints.insert(worker.id.clone(), format!("{scheme}://{addr}"));
                tasks.spawn(accept_loop(
                    listener,
                    acceptor.clone(),
                    fleet.clone(),
                    api.clone(),
                    Some(worker.clone()),
                ));
            }
        }
        Addressing::Prefix => {
            let listener = TcpListener::bind(SocketAddr::new(opts.host, opts.port)).await?;
            let addr = listener.local_addr()?;
            for worker in &fleet.workers {
                // The trailing slash matters: clients join `api/v0/` onto the endpoint.
                endpoints.insert(
                    worker.id.clone(),
                    format!("{scheme}://{addr}/w/{}/", worker.id),
                );
            }
            tasks.spawn(accept_loop(
                listener,
                acceptor.clone(),
                fleet.clone(),
                api.clone(),
                None,
            ));
        }
    }
    Ok(RunningFleet {
        fleet,
        endpoints,
        ca_pem,
        ca_path,
        tasks,
    })
}

pub fn write_file(dir: &Path, name: &str, contents: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    std::fs::write(&path, contents)?;
    Ok(path)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    fleet: Arc<Fleet>,
    api: Router,
    worker: Option<Arc<SimWorker>>,
) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, fleet, api, worker) =
            (acceptor.clone(), fleet.clone(), api.clone(), worker.clone());
        let open = fleet.connection_opened();
        conns.spawn(async move {
            let _open = open;
            let fd = stream.as_raw_fd();
            let ctl = ConnControl::default();
            let svc_ctl = ctl.clone();
            let svc = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (fleet, api, worker, ctl) =
                    (fleet.clone(), api.clone(), worker.clone(), svc_ctl.clone());
                async move {
                    Ok::<_, Infallible>(route(req.map(Body::new), &fleet, api, worker, ctl).await)
                }
            });
            let svc = TowerToHyperService::new(svc);
            let builder = auto::Builder::new(TokioExecutor::new());
            match acceptor {
                Some(acceptor) => {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = ctl.0.notified() => reset(fd),
                    }
                }
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = ctl.0.notified() => reset(fd),
                    }
                }
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
    }
}

/// Chooses the worker (by listener, or by the `/w/<id>` prefix) and hands the request to the API.
async fn route(
    mut req: Request<Body>,
    fleet: &Fleet,
    api: Router,
    worker: Option<Arc<SimWorker>>,
    ctl: ConnControl,
) -> axum::response::Response {
    let worker = match worker {
        Some(w) => w,
        None => {
            let path = req.uri().path().to_owned();
            let Some((id, rest)) = path.strip_prefix("/w/").and_then(|p| p.split_once('/')) else {
                return api::cml_error(http::StatusCode::NOT_FOUND, "unknown worker");
            };
            let Some(w) = fleet.worker(id) else {
                return api::cml_error(http::StatusCode::NOT_FOUND, format!("unknown worker {id}"));
            };
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            match format!("/{rest}{query}").parse() {
                Ok(uri) => *req.uri_mut() = uri,
                Err(_) => return api::cml_error(http::StatusCode::BAD_REQUEST, "bad path"),
            }
            w
        }
    };
    req.extensions_mut().insert(worker);
    req.extensions_mut().insert(ctl);
    match api.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// Makes the close that follows send RST instead of FIN: the client sees "connection reset".
fn reset(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` belongs to the stream owned by the connection future, which is still alive
    // here and is dropped (closing the socket) right after this call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
