//! Test support: a MongoDB-wire server shared by one test binary (or `MONGODB_URI`), and a
//! database of its own for every test so tests run in parallel.
//!
//! With `MONGODB_URI` set, tests use that server (a real mongod, say). Without it, the first test
//! that asks starts SecantusDB's `secantusd-rs` (installed by `scripts/install-secantus`) on a
//! free port with a throw-away data directory; it dies with the test process.

#![allow(unsafe_code)] // one `pre_exec` hook, see `spawn_tied_to_this_process`

use std::{
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use mongodb::{
    bson::doc,
    event::{command::CommandEvent, EventHandler},
    options::ClientOptions,
    Client, Database,
};

/// The stand-in binary; override with `SECANTUSD` to use another path.
pub fn stand_in_binary() -> String {
    std::env::var("SECANTUSD").unwrap_or_else(|_| "secantusd-rs".to_owned())
}

/// A MongoDB-wire server process owned by the test binary.
#[derive(Debug)]
pub struct StandIn {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

impl StandIn {
    /// Starts a fresh server on a free port with an empty data directory.
    pub fn start() -> io::Result<Self> {
        let base = std::env::temp_dir().join("cml-labs-tests");
        std::fs::create_dir_all(&base)?;
        remove_stale_dirs(&base);
        let root = base.join(format!(
            "standin-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&root)?;
        let mut server = Self {
            child: None,
            port: 0,
            root,
        };
        server.launch(0)?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s). Data stays for [`StandIn::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: plain syscall on a pid we own and have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let port = self.port;
        // The port was just released; another process may grab it, so retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch(port) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn launch(&mut self, port: u16) -> io::Result<()> {
        let data = self.root.join("data");
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("server.log"))?;
        let mut cmd = Command::new(stand_in_binary());
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(&data)
            .args([
                "--cache-size",
                "128M",
                "--log-file-max",
                "16MB",
                "--log-level",
                "WARNING",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = spawn_tied_to_this_process(cmd).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot start {} ({e}); run scripts/install-secantus or set MONGODB_URI",
                    stand_in_binary()
                ),
            )
        })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            // Keep draining so the server never blocks on a full pipe.
            for line in lines.by_ref().map_while(Result::ok) {
                if !sent {
                    if let Some(addr) = line.split("listening on ").nth(1) {
                        let port = addr
                            .rsplit(':')
                            .next()
                            .and_then(|p| p.trim().parse::<u16>().ok());
                        let _ = tx.send(port);
                        sent = true;
                    }
                }
            }
            if !sent {
                let _ = tx.send(None);
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(port)) => {
                self.port = port;
                self.child = Some(child);
                Ok(())
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
                Err(io::Error::other(format!(
                    "{} did not report its port; its log:\n{}",
                    stand_in_binary(),
                    log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
                )))
            }
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Spawns `cmd` so that it is killed when this process dies, however it dies.
///
/// Linux delivers the parent-death signal when the *thread* that forked exits, so every spawn
/// happens on one thread that lives as long as the process.
fn spawn_tied_to_this_process(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("stand-in-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    #[cfg(target_os = "linux")]
                    {
                        use std::os::unix::process::CommandExt;
                        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                        unsafe {
                            cmd.pre_exec(|| {
                                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                    return Err(io::Error::last_os_error());
                                }
                                Ok(())
                            });
                        }
                    }
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static: this loop never ends, and neither does the thread.
            })
            .expect("spawn the stand-in spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| io::Error::other("spawner poisoned"))?
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner gone"))?;
    rx.recv().map_err(|_| io::Error::other("spawner gone"))?
}

/// Data directories of test processes that no longer run (killed before they could clean up).
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("standin-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `MONGODB_URI` when set; otherwise the URI of this test binary's shared stand-in server.
pub fn mongodb_uri() -> String {
    if let Ok(uri) = std::env::var("MONGODB_URI") {
        if !uri.trim().is_empty() {
            return uri;
        }
    }
    static SHARED: OnceLock<String> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let server = StandIn::start().unwrap_or_else(|e| panic!("{e}"));
            let uri = server.uri();
            // Lives until the process exits; the parent-death signal then stops the server.
            std::mem::forget(server);
            uri
        })
        .clone()
}

/// True when tests run against a server given by `MONGODB_URI` (which tests must not stop).
pub fn external_server() -> bool {
    std::env::var("MONGODB_URI").is_ok_and(|u| !u.trim().is_empty())
}

/// A stand-in of the test's own, for tests that stop and restart their server. `None` (the
/// test is skipped, with a note) when the stand-in cannot start while tests run against an
/// external server; without one, that is a failure.
pub fn own_stand_in() -> Option<StandIn> {
    match StandIn::start() {
        Ok(server) => Some(server),
        Err(e) if external_server() => {
            eprintln!("skipped: needs the MongoDB stand-in to stop and restart ({e})");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The names of commands a client sent, in order.
#[derive(Debug, Clone, Default)]
pub struct CommandLog(Arc<Mutex<Vec<String>>>);

impl CommandLog {
    pub fn handler(&self, database: &str) -> EventHandler<CommandEvent> {
        let log = self.0.clone();
        let database = database.to_owned();
        EventHandler::callback(move |event: CommandEvent| {
            if let CommandEvent::Started(started) = event {
                if started.db == database || started.command_name == "bulkWrite" {
                    if let Ok(mut log) = log.lock() {
                        log.push(started.command_name.clone());
                    }
                }
            }
        })
    }

    pub fn take(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
}

/// A database of the test's own, dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub client: Client,
    pub db: Database,
    pub uri: String,
    pub commands: CommandLog,
}

impl TestDb {
    /// A fresh database named after the test, on the shared server.
    pub async fn new(test: &str) -> Self {
        Self::on(&mongodb_uri(), test).await
    }

    /// A fresh database on the server at `uri`.
    pub async fn on(uri: &str, test: &str) -> Self {
        let name = unique_db_name(test);
        let commands = CommandLog::default();
        let mut options = ClientOptions::parse(uri).await.expect("valid MongoDB URI");
        options.server_selection_timeout = Some(Duration::from_secs(10));
        options.command_event_handler = Some(commands.handler(&name));
        let client = Client::with_options(options).expect("client");
        let db = client.database(&name);
        db.run_command(doc! { "ping": 1 })
            .await
            .expect("MongoDB answers ping");
        commands.take();
        Self {
            client,
            db,
            uri: uri.to_owned(),
            commands,
        }
    }

    pub fn name(&self) -> &str {
        self.db.name()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let uri = self.uri.clone();
        let name = self.db.name().to_owned();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread of its own.
        let _ = thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut options) = ClientOptions::parse(&uri).await else {
                    return;
                };
                options.server_selection_timeout = Some(Duration::from_secs(2));
                if let Ok(client) = Client::with_options(options) {
                    let _ = client.database(&name).drop().await;
                }
            });
        })
        .join();
    }
}

/// `t_<test>_<random>`, within MongoDB's 63-byte limit on database names.
pub fn unique_db_name(test: &str) -> String {
    let clean: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{clean}_{}", &suffix[..12])
}

/// Waits until `check` returns `Some`, polling every 20 ms; panics with `what` after `timeout`.
/// Tests wait on conditions (a document, a counter, a socket), never on the clock alone.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub mod logs;
pub mod metrics;
pub mod origin;
