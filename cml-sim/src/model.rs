//! The simulated fleet's data: workers, their labs, version personalities and injected faults.
//!
//! Everything is generated from a seed, so a fleet is the same on every run.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use bytes::Bytes;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::record::LabState;
use tokio::sync::{broadcast, watch};

use crate::directory::{seeded_id, seeded_password, Directory, Group, SEEDED};

/// A small, fast, deterministic generator (SplitMix64); quality is ample for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A version-4-shaped UUID.
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next_u64(), self.next_u64());
        let bytes: Vec<u8> = a.to_be_bytes().into_iter().chain(b.to_be_bytes()).collect();
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        uuid::Uuid::from_bytes(b).to_string()
    }
}

/// Which CML release a simulated server imitates; payloads differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Personality {
    /// Groups as `{id, name, permission}` objects; no `owner_fullname`; `+00:00` times.
    #[serde(rename = "2.4")]
    V2_4,
    /// Groups `[]`; `owner_fullname` and `effective_permissions`.
    #[serde(rename = "2.9")]
    V2_9,
    /// No `groups`; `autostart` and `node_staging`; `Z` times; `/authentication`.
    #[serde(rename = "2.10")]
    V2_10,
}

impl Personality {
    pub const ALL: [Personality; 3] = [Personality::V2_4, Personality::V2_9, Personality::V2_10];

    pub fn version(self) -> &'static str {
        match self {
            Personality::V2_4 => "2.4.1+build.2",
            Personality::V2_9 => "2.9.1+build.7",
            Personality::V2_10 => "2.10.0+build.3",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "2.4" => Some(Personality::V2_4),
            "2.9" => Some(Personality::V2_9),
            "2.10" => Some(Personality::V2_10),
            _ => None,
        }
    }

    fn time(self, t: DateTime<Utc>) -> String {
        match self {
            Personality::V2_10 => t.to_rfc3339_opts(SecondsFormat::Secs, true),
            _ => t.to_rfc3339_opts(SecondsFormat::Secs, false),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimUser {
    pub id: String,
    pub username: String,
    pub fullname: String,
}

/// A lab's association with a group: the group, and what its members may do with the lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimGroup {
    pub id: String,
    pub name: String,
    /// `lab_admin`, `lab_edit`, `lab_exec`, `lab_view` (2.9+); 2.4 shows `read_write` when
    /// any but `lab_view` and `lab_exec` is there, else `read_only`.
    #[serde(default = "view_only")]
    pub permissions: Vec<String>,
}

/// A lab's association with a user (2.9+): the user's id and its permissions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimShare {
    pub id: String,
    pub permissions: Vec<String>,
}

/// The permissions CML 2.9+ knows for a lab association.
pub const LAB_PERMISSIONS: [&str; 4] = ["lab_admin", "lab_edit", "lab_exec", "lab_view"];

fn view_only() -> Vec<String> {
    vec!["lab_view".to_owned()]
}

impl SimGroup {
    /// 2.4's single permission.
    fn permission(&self) -> &'static str {
        let writes = self
            .permissions
            .iter()
            .any(|p| p == "lab_admin" || p == "lab_edit");
        if writes {
            "read_write"
        } else {
            "read_only"
        }
    }
}

/// One lab on one simulated server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimLab {
    pub id: String,
    pub title: String,
    pub description: String,
    pub notes: String,
    pub state: String,
    pub owner: SimUser,
    pub node_count: u32,
    pub link_count: u32,
    pub groups: Vec<SimGroup>,
    /// The users it is shared with (2.9+ associations), besides its owner.
    #[serde(default)]
    pub user_shares: Vec<SimShare>,
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
}

impl SimLab {
    /// The names of the groups the lab is shared with, sorted and without repeats (as a
    /// record lists them).
    pub fn group_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.groups.iter().map(|g| g.name.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The lab object of `GET labs/{id}`, shaped by the server's release.
    pub fn to_json(&self, p: Personality) -> Value {
        let mut v = json!({
            "id": self.id,
            "created": p.time(self.created),
            "modified": p.time(self.modified),
            "lab_title": self.title,
            "lab_description": self.description,
            "lab_notes": self.notes,
            "owner": self.owner.id,
            "owner_username": self.owner.username,
            "state": self.state,
            "node_count": self.node_count,
            "link_count": self.link_count,
        });
        let o = v.as_object_mut().expect("object literal");
        match p {
            Personality::V2_4 => {
                o.insert(
                    "groups".into(),
                    self.groups
                        .iter()
                        .map(
                            |g| json!({ "id": g.id, "name": g.name, "permission": g.permission() }),
                        )
                        .collect(),
                );
            }
            Personality::V2_9 => {
                o.insert("owner_fullname".into(), json!(self.owner.fullname));
                o.insert(
                    "effective_permissions".into(),
                    json!(["lab_admin", "lab_edit", "lab_exec", "lab_view"]),
                );
                o.insert("groups".into(), json!([]));
            }
            Personality::V2_10 => {
                o.insert("owner_fullname".into(), json!(self.owner.fullname));
                o.insert(
                    "effective_permissions".into(),
                    json!(["lab_admin", "lab_edit", "lab_exec", "lab_view"]),
                );
                o.insert(
                    "autostart".into(),
                    json!({ "enabled": false, "priority": null, "delay": null }),
                );
                o.insert(
                    "node_staging".into(),
                    json!({ "enabled": false, "start_remaining": true, "abort_on_failure": false }),
                );
            }
        }
        v
    }

    /// A tile of `populate_lab_tiles`: the lab object plus a topology summary.
    pub fn to_tile(&self, p: Personality) -> Value {
        let mut v = self.to_json(p);
        use crate::events::{node_id, node_state};
        let node_state = node_state(&self.state);
        let nodes: Vec<Value> = (0..self.node_count)
            .map(|i| {
                json!({
                    "id": node_id(i), "label": format!("node-{i}"), "node_definition": "iosv",
                    "x": i * 100, "y": 0, "state": node_state,
                })
            })
            .collect();
        let links: Vec<Value> = (0..self.link_count)
            .map(|i| {
                json!({
                    "id": format!("l{i}"),
                    "node_a": node_id(i % self.node_count.max(1)),
                    "node_b": node_id((i + 1) % self.node_count.max(1)),
                    "state": node_state,
                })
            })
            .collect();
        v["topology"] = json!({ "nodes": nodes, "links": links, "lab": { "title": self.title } });
        v
    }
}

/// Faults injected into one simulated server's answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every answer.
    pub latency_ms: u64,
    /// Share of API calls (0.0–1.0) answered with one of `error_statuses`.
    pub error_rate: f64,
    /// Statuses used by `error_rate`; empty means 500, 502 and 503.
    pub error_statuses: Vec<u16>,
    /// Never answer.
    pub hang: bool,
    /// Hold every call (counted, then waiting) until this is cleared again: tests use it to
    /// know a call is in flight.
    pub hold: bool,
    /// Hold the calls of this endpoint only (named as [`SimWorker::calls`] counts it, e.g.
    /// `labs` for the id list), as `hold` does.
    pub hold_endpoint: Option<String>,
    /// Answer the next this many calls with 502, then answer normally again.
    pub fail_next: u32,
    /// Injected error answers carry a `description` this many bytes long.
    pub error_description_bytes: usize,
    /// Reset the connection instead of answering.
    pub reset: bool,
    /// Answer data endpoints with broken JSON.
    pub malformed_json: bool,
    /// Announce a body longer than the one sent, then close.
    pub truncated_body: bool,
    /// `GET labs` answers 404.
    pub labs_list_404: bool,
    /// `populate_lab_tiles` does not exist (404), as on servers that predate it.
    pub bulk_missing: bool,
    /// `populate_lab_tiles` answers `{"lab_tiles": {}}` (a proxy or a server still starting).
    pub empty_tiles: bool,
    /// `populate_lab_tiles` carries this many more bytes, in the title of one more lab
    /// (streamed: the simulator never holds them).
    pub tiles_padding_bytes: u64,
    /// Calls of these endpoints (named as [`SimWorker::calls`] counts them, e.g. `groups`)
    /// fail this way, whatever the other faults.
    pub endpoint_faults: BTreeMap<String, EndpointFault>,
    /// `authenticate` answers `307 Temporary Redirect` to this URL.
    pub redirect_login_to: Option<String>,
    /// `populate_lab_tiles` answers `302 Found` to this URL.
    pub redirect_tiles_to: Option<String>,
    /// The `/ws/ui` upgrade answers `302 Found` to this URL.
    pub redirect_ws_to: Option<String>,
    /// The next this many `/ws/ui` authentications are refused (close 3000) whatever the token.
    pub ws_refuse_tokens: u32,
    /// Right after authentication, `/ws/ui` sends a text frame that is not JSON.
    pub ws_garbage: bool,
    /// Right after authentication, `/ws/ui` sends one text message this many bytes long.
    pub ws_oversized_bytes: usize,
    /// `/ws/ui` is served by a hostile or broken server, frame by frame (no authentication).
    pub ws_hostile: Option<WsHostile>,
    /// The object of the lab with the first id (its tile, `GET labs/{id}`) names the second
    /// id instead: a server whose answer is about another lab than the one asked for.
    pub lab_named_as: Option<(String, String)>,
}

/// How a hostile `/ws/ui` behaves after the upgrade; it never reads what the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WsHostile {
    /// Pings with 125-byte payloads, `per_second` (0: as fast as it can write), and a stats
    /// message every `text_every_ms` (0: none).
    Pings { per_second: u32, text_every_ms: u64 },
    /// `messages` stats messages, then a close frame with `code` (0: the connection ends
    /// without one).
    CloseAfter { messages: u32, code: u16 },
    /// The first `bytes` of a text message as a fragment, then a continuation frame announced
    /// `bytes` long of which all but the last byte are sent; then nothing.
    Unfinished { bytes: usize },
}

/// How calls of one endpoint fail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointFault {
    /// Answer this HTTP status with CML's error body (`{"status": 403}`).
    Status(u16),
    /// Answer 200 with a body that is not JSON (`"malformed"`).
    Malformed,
}

/// Serialised tiles of one worker: the whole body, and each lab's `"id":{tile}` part.
#[derive(Debug, Default)]
struct TileCache {
    body: Option<Bytes>,
    labs: HashMap<String, String>,
}

/// One simulated CML server.
#[derive(Debug)]
pub struct SimWorker {
    pub id: String,
    pub name: String,
    pub aws_region: String,
    pub personality: Personality,
    labs: Mutex<BTreeMap<String, SimLab>>,
    /// The server's users and groups (labs refer to groups in their `groups`).
    directory: Mutex<Directory>,
    /// The `populate_lab_tiles` body and each lab's part of it, rebuilt only for what changed
    /// (a real server's cost is the configured latency, not this process's CPU). Locked only
    /// while `labs` is held.
    tiles: Mutex<TileCache>,
    /// The faults, watched by held calls so they go on once `hold` is cleared.
    faults: watch::Sender<Faults>,
    /// Tokens carry the epoch they were issued in; bumping it expires them all.
    token_epoch: AtomicU64,
    rng: Mutex<Rng>,
    /// Counts of API calls by endpoint name, for tests.
    calls: Mutex<BTreeMap<String, u64>>,
    /// The `/ws/ui` messages of this server's changes, for every open stream (2.6+ only).
    events: broadcast::Sender<Arc<str>>,
    /// Bumped to drop every open `/ws/ui` stream.
    streams_epoch: watch::Sender<u64>,
    /// `/ws/ui` streams open now.
    streams_open: Arc<AtomicUsize>,
    /// Calls waiting at the gate now (the `hold` and `hold_endpoint` faults), by endpoint.
    held: Mutex<BTreeMap<String, usize>>,
}

/// Messages a `/ws/ui` stream may fall behind by before the server drops it.
const EVENTS_BACKLOG: usize = 4096;

/// Counts a `/ws/ui` stream as open until dropped.
#[derive(Debug)]
pub struct OpenStream(Arc<AtomicUsize>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const TITLES: [&str; 8] = [
    "CCNA practice",
    "BGP lab",
    "OSPF areas",
    "Firewall test",
    "SD-WAN pilot",
    "MPLS core",
    "Campus LAN",
    "DMVPN",
];
const GROUPS: [&str; 4] = ["netops", "students", "admins", "lab-team"];
/// Users per team of [`SimWorker::add_teams`].
const TEAM: usize = 10;

impl SimWorker {
    /// A worker with `labs` generated labs, all from `rng`.
    pub fn generate(index: usize, labs: usize, personality: Personality, rng: &mut Rng) -> Self {
        let id = rng.uuid();
        let regions = ["us-east-1", "us-west-2", "eu-west-1", "ap-southeast-1"];
        let worker = Self {
            name: format!("cml-worker-{index:04}"),
            aws_region: rng.pick(&regions).to_string(),
            personality,
            labs: Mutex::new(BTreeMap::new()),
            directory: Mutex::new(Directory::default()),
            tiles: Mutex::new(TileCache::default()),
            faults: watch::Sender::new(Faults::default()),
            token_epoch: AtomicU64::new(0),
            rng: Mutex::new(Rng::new(rng.next_u64())),
            calls: Mutex::new(BTreeMap::new()),
            events: broadcast::Sender::new(EVENTS_BACKLOG),
            streams_epoch: watch::Sender::new(0),
            streams_open: Arc::new(AtomicUsize::new(0)),
            held: Mutex::new(BTreeMap::new()),
            id,
        };
        let seeded = Directory::seeded(|name| worker.group_id(name));
        *lock(&worker.directory) = seeded;
        for _ in 0..labs {
            worker.create_lab(None);
        }
        worker
    }

    /// The seeded users (generated labs are owned by one of them).
    pub fn users() -> Vec<SimUser> {
        SEEDED
            .iter()
            .enumerate()
            .map(|(i, (u, f))| SimUser {
                id: seeded_id(i),
                username: (*u).to_owned(),
                fullname: (*f).to_owned(),
            })
            .collect()
    }

    /// Runs `f` on the server's users and groups.
    pub fn directory<T>(&self, f: impl FnOnce(&mut Directory) -> T) -> T {
        f(&mut lock(&self.directory))
    }

    /// The labs CML lists for the user (by id): all for an admin (`show_all`), else the user's
    /// own and those shared with them.
    pub fn labs_visible_to(&self, user_id: &str) -> Vec<SimLab> {
        let dir = lock(&self.directory);
        lock(&self.labs)
            .values()
            .filter(|l| dir.sees(user_id, l, self.personality))
            .cloned()
            .collect()
    }

    /// `GET users`: every user of the server (see [`Directory::users_json`]).
    pub fn users_json(&self) -> Value {
        let dir = lock(&self.directory);
        let labs = lock(&self.labs);
        dir.users_json(labs.values(), self.personality)
    }

    /// One user as `GET users` shows it.
    pub fn user_json(&self, user_id: &str) -> Option<Value> {
        match self.users_json() {
            Value::Array(users) => users.into_iter().find(|u| u["id"] == user_id),
            _ => None,
        }
    }

    /// Whether CML shows the lab to the user.
    pub fn sees(&self, user_id: &str, lab: &SimLab) -> bool {
        lock(&self.directory).sees(user_id, lab, self.personality)
    }

    /// Adds a lab (generated unless given) and returns its id.
    pub fn create_lab(&self, lab: Option<SimLab>) -> String {
        let lab = lab.unwrap_or_else(|| {
            let mut rng = lock(&self.rng);
            let users = Self::users();
            let created = Utc::now() - Duration::seconds(rng.below(90 * 86_400) as i64);
            let created = created.with_nanosecond0();
            let nodes = rng.below(12) as u32;
            let mut groups: Vec<SimGroup> = Vec::new();
            for _ in 0..rng.below(3) {
                let name = rng.pick(&GROUPS).to_string();
                if groups.iter().all(|g| g.name != name) {
                    groups.push(SimGroup {
                        id: self.group_named(&name),
                        permissions: view_only(),
                        name,
                    });
                }
            }
            SimLab {
                id: rng.uuid(),
                title: format!("{} {}", rng.pick(&TITLES), rng.below(1000)),
                description: if rng.below(2) == 0 {
                    String::new()
                } else {
                    "A lab for practice.".into()
                },
                notes: if rng.below(3) == 0 {
                    "## Notes\n\nRemember to save configs.".into()
                } else {
                    String::new()
                },
                state: rng.pick(&LabState::ALL).to_string(),
                owner: rng.pick(&users).clone(),
                node_count: nodes,
                link_count: nodes.saturating_sub(1),
                groups,
                user_shares: Vec::new(),
                created,
                modified: created,
            }
        });
        let id = lab.id.clone();
        let mut labs = self.labs_mut(&id);
        self.publish(labs.get(&id), Some(&lab));
        labs.insert(id.clone(), lab);
        id
    }

    /// The id of the group named `name`, made now if the server has none of that name (ids
    /// follow from the worker and the name, so a fleet is the same on every run).
    pub fn group_named(&self, name: &str) -> String {
        let mut dir = lock(&self.directory);
        if let Some(g) = dir.group_by_name(name) {
            return g.id.clone();
        }
        let id = self.group_id(name);
        dir.groups.insert(
            id.clone(),
            Group {
                id: id.clone(),
                name: name.to_owned(),
                description: String::new(),
            },
        );
        id
    }

    /// Adds `n` users (`user-000`…, passwords as [`seeded_password`] gives)
    /// in teams of ten (`team-00`…), and shares each lab with one team (`lab_view`) in turn:
    /// with ten or more users, each of them sees a team's share of the labs, as a user of a
    /// busy server does. The labs' `modified` times stay.
    pub fn add_teams(&self, n: usize) {
        if n == 0 {
            return;
        }
        let teams: Vec<String> = (0..n.div_ceil(TEAM))
            .map(|t| self.group_named(&format!("team-{t:02}")))
            .collect();
        self.directory(|dir| {
            for i in 0..n {
                let name = format!("user-{i:03}");
                let team = BTreeSet::from([teams[i / TEAM].clone()]);
                dir.add_user(&name, &seeded_password(&name), "", false, team);
            }
        });
        let mut labs = self.labs_mut("");
        *lock(&self.tiles) = TileCache::default();
        for (k, lab) in labs.values_mut().enumerate() {
            let id = &teams[k % teams.len()];
            lab.groups.push(SimGroup {
                id: id.clone(),
                name: format!("team-{:02}", k % teams.len()),
                permissions: view_only(),
            });
        }
    }

    /// The id a group named `name` has on this server.
    fn group_id(&self, name: &str) -> String {
        let seed = format!("{}/{name}", self.id)
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        Rng::new(seed).uuid()
    }

    /// The name of the group `id`, if the server has it.
    pub fn group_name(&self, id: &str) -> Option<String> {
        lock(&self.directory).groups.get(id).map(|g| g.name.clone())
    }

    /// Sets the groups a lab is associated with (its `modified` time stays: the lab itself
    /// did not change); false when the lab does not exist.
    pub fn set_lab_groups(&self, lab_id: &str, groups: Vec<SimGroup>) -> bool {
        self.update_lab_quietly(lab_id, |lab| lab.groups = groups)
    }

    /// Changes a lab's sharing (its `modified` time stays and no lab message goes out: the lab
    /// itself did not change); false when the lab does not exist.
    pub fn update_lab_quietly(&self, lab_id: &str, f: impl FnOnce(&mut SimLab)) -> bool {
        match self.labs_mut(lab_id).get_mut(lab_id) {
            Some(lab) => {
                f(lab);
                true
            }
            None => false,
        }
    }

    /// Whether the lab is shared with the user (by id), by a group or directly.
    pub fn shared_with(&self, user_id: &str, lab: &SimLab) -> bool {
        lock(&self.directory).shared_with(user_id, lab, self.personality)
    }

    /// `GET groups`: the groups with their members and labs, as the server's release shows
    /// them (2.9+: `associations` with permissions; before: `labs` with one permission each);
    /// `only` limits them to those ids (what a non-admin sees: its own groups).
    pub fn groups_json(&self, only: Option<&BTreeSet<String>>) -> Value {
        let dir = lock(&self.directory);
        let mut shares: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        let labs = lock(&self.labs);
        for lab in labs.values() {
            for g in &lab.groups {
                let entry = match self.personality {
                    Personality::V2_4 if g.permissions.is_empty() => continue,
                    Personality::V2_4 => json!({ "id": lab.id, "permission": g.permission() }),
                    _ => json!({ "id": lab.id, "permissions": g.permissions }),
                };
                shares.entry(g.id.as_str()).or_default().push(entry);
            }
        }
        let key = match self.personality {
            Personality::V2_4 => "labs",
            _ => "associations",
        };
        Value::from(
            dir.groups
                .values()
                .filter(|g| only.is_none_or(|o| o.contains(&g.id)))
                .map(|g| {
                    json!({
                        "id": g.id, "name": g.name, "description": g.description,
                        "members": dir.members(&g.id), key: shares.remove(g.id.as_str()).unwrap_or_default(),
                        "created": "2024-01-01T00:00:00+00:00", "modified": "2024-01-01T00:00:00+00:00",
                    })
                })
                .collect::<Vec<_>>(),
        )
    }

    pub fn delete_lab(&self, lab_id: &str) -> bool {
        let removed = self.labs_mut(lab_id).remove(lab_id);
        self.publish(removed.as_ref(), None);
        removed.is_some()
    }

    /// Whether this server has the `/ws/ui` event stream (CML 2.6+).
    pub fn has_event_stream(&self) -> bool {
        self.personality != Personality::V2_4
    }

    /// Sends the stream messages of a lab's change to every open stream (called with the labs
    /// locked, so streams see changes in the order they were made).
    fn publish(&self, before: Option<&SimLab>, after: Option<&SimLab>) {
        if !self.has_event_stream() || self.events.receiver_count() == 0 {
            return;
        }
        for message in crate::events::lab_changed(before, after) {
            let _ = self.events.send(Arc::from(message.to_string()));
        }
    }

    /// Tells every open stream (2.9+) that a user or a group changed: `{"event_type":
    /// "user_event" | "group_event", "event": "created" | "modified" | "deleted",
    /// "element_id": <id>}` (CML's schema defines such events; their exact shape is a guess).
    pub fn announce_access(&self, element: &str, event: &str, id: &str) {
        if self.personality == Personality::V2_4 || self.events.receiver_count() == 0 {
            return;
        }
        let message = json!({
            "event_type": format!("{element}_event"), "event": event, "element_type": element,
            "element_id": id, "lab_id": null, "data": {},
        });
        let _ = self.events.send(Arc::from(message.to_string()));
    }

    /// Moves every node of `lab_id` to `state` without changing the lab (as single nodes
    /// started or stopped from CML's UI): only their `state_change` messages go out. Returns
    /// how many went out (0 for an unknown lab, or without an open stream).
    pub fn change_node_states(&self, lab_id: &str, state: &str) -> usize {
        let labs = lock(&self.labs);
        let Some(lab) = labs.get(lab_id) else {
            return 0;
        };
        if !self.has_event_stream() || self.events.receiver_count() == 0 {
            return 0;
        }
        let messages = crate::events::node_states(lab, state);
        let n = messages.len();
        for message in messages {
            let _ = self.events.send(Arc::from(message.to_string()));
        }
        n
    }

    /// The messages of the changes made from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    /// Drops every open `/ws/ui` stream (as a restarting server or a broken network would).
    pub fn drop_streams(&self) {
        self.streams_epoch.send_modify(|e| *e += 1);
    }

    /// Changes when the streams open now are to be dropped.
    pub fn streams_epoch(&self) -> watch::Receiver<u64> {
        self.streams_epoch.subscribe()
    }

    /// Counts a `/ws/ui` stream as open until the guard is dropped.
    pub fn stream_opened(&self) -> OpenStream {
        self.streams_open.fetch_add(1, Ordering::SeqCst);
        OpenStream(self.streams_open.clone())
    }

    /// `/ws/ui` streams authenticated and following this server's changes now.
    pub fn listening_streams(&self) -> usize {
        self.events.receiver_count()
    }

    /// `/ws/ui` streams open now.
    pub fn open_streams(&self) -> usize {
        self.streams_open.load(Ordering::SeqCst)
    }

    /// Takes one of the `ws_refuse_tokens` refusals, if any are left.
    pub fn take_token_refusal(&self) -> bool {
        self.take_one(|f| &mut f.ws_refuse_tokens)
    }

    /// The labs, to change `lab_id`: its cached tile and the body go while the lock is held.
    fn labs_mut(&self, lab_id: &str) -> MutexGuard<'_, BTreeMap<String, SimLab>> {
        let labs = lock(&self.labs);
        let mut tiles = lock(&self.tiles);
        tiles.body = None;
        tiles.labs.remove(lab_id);
        labs
    }

    /// The `populate_lab_tiles` body: `{"lab_tiles": {id: tile}}`. The tiles of labs changed
    /// since the last body are rendered outside the locks (from copies of those labs only), so
    /// a large rebuild never holds up the server's other answers.
    pub fn tiles_body(&self) -> Bytes {
        loop {
            let stale: Vec<SimLab> = {
                let labs = lock(&self.labs);
                let cache = lock(&self.tiles);
                if let Some(body) = cache.body.as_ref() {
                    return body.clone();
                }
                labs.values()
                    .filter(|l| !cache.labs.contains_key(&l.id))
                    .cloned()
                    .collect()
            };
            let rendered: Vec<(String, String)> = stale
                .iter()
                .map(|lab| {
                    let tile = format!(
                        "{}:{}",
                        Value::from(lab.id.as_str()),
                        self.lab_object(lab, true)
                    );
                    (lab.id.clone(), tile)
                })
                .collect();
            let labs = lock(&self.labs);
            let mut cache = lock(&self.tiles);
            for (id, tile) in rendered {
                // A lab changed meanwhile has no cached tile until rendered again.
                if stale.iter().any(|l| l.id == id && labs.get(&id) == Some(l)) {
                    cache.labs.insert(id, tile);
                }
            }
            if labs.keys().any(|id| !cache.labs.contains_key(id)) {
                continue;
            }
            let mut body = String::from(r#"{"lab_tiles":{"#);
            for (i, id) in labs.keys().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&cache.labs[id]);
            }
            body.push_str("}}");
            let body = Bytes::from(body);
            cache.body = Some(body.clone());
            return body;
        }
    }

    /// Applies `f` to a lab and bumps its `modified` time; false when the lab does not exist.
    pub fn update_lab(&self, lab_id: &str, f: impl FnOnce(&mut SimLab)) -> bool {
        let mut labs = self.labs_mut(lab_id);
        match labs.get_mut(lab_id) {
            Some(lab) => {
                let before = (self.has_event_stream() && self.events.receiver_count() > 0)
                    .then(|| lab.clone());
                f(lab);
                lab.modified = Utc::now().with_nanosecond0().max(lab.modified);
                if let Some(before) = before {
                    self.publish(Some(&before), Some(lab));
                }
                true
            }
            None => false,
        }
    }

    pub fn lab(&self, lab_id: &str) -> Option<SimLab> {
        lock(&self.labs).get(lab_id).cloned()
    }

    pub fn labs(&self) -> Vec<SimLab> {
        lock(&self.labs).values().cloned().collect()
    }

    /// The stats messages of a `/ws/ui` tick: `system_stats`, then `lab_stats` of each
    /// running lab.
    pub fn stats_messages(&self) -> Vec<String> {
        let labs = lock(&self.labs);
        let running: Vec<&SimLab> = labs.values().filter(|l| l.state == "STARTED").collect();
        std::iter::once(crate::events::system_stats(labs.len(), running.len()))
            .chain(running.iter().map(|l| crate::events::lab_stats(l)))
            .map(|m| m.to_string())
            .collect()
    }

    pub fn lab_ids(&self) -> Vec<String> {
        lock(&self.labs).keys().cloned().collect()
    }

    pub fn faults(&self) -> Faults {
        self.faults.borrow().clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.faults.send_replace(faults);
        // The cached tiles may name labs as the faults said.
        let mut tiles = lock(&self.tiles);
        tiles.body = None;
        tiles.labs.clear();
    }

    /// Sends `text` on every open `/ws/ui` stream, as a server would send a message of its
    /// own (an event naming a lab id that is not one, say).
    pub fn send_stream_message(&self, text: &str) {
        let _ = self.events.send(Arc::from(text));
    }

    /// A lab's object as this server answers it (`lab_named_as` applied).
    pub fn lab_object(&self, lab: &SimLab, tile: bool) -> Value {
        let mut v = if tile {
            lab.to_tile(self.personality)
        } else {
            lab.to_json(self.personality)
        };
        if let Some((id, named)) = self.faults.borrow().lab_named_as.as_ref() {
            if *id == lab.id {
                v["id"] = Value::from(named.as_str());
            }
        }
        v
    }

    /// Waits while calls of `endpoint` are held (the `hold` and `hold_endpoint` faults).
    pub async fn while_held(&self, endpoint: &str) {
        let mut faults = self.faults.subscribe();
        let free = |f: &Faults| !f.hold && f.hold_endpoint.as_deref() != Some(endpoint);
        if free(&faults.borrow_and_update()) {
            return;
        }
        /// Counts a call as held until it goes on, or its client goes.
        struct Held<'a>(&'a Mutex<BTreeMap<String, usize>>, &'a str);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                if let Some(n) = lock(self.0).get_mut(self.1) {
                    *n -= 1;
                }
            }
        }
        *lock(&self.held).entry(endpoint.to_owned()).or_default() += 1;
        let _held = Held(&self.held, endpoint);
        // The sender lives as long as the worker, so this only ends when the hold is cleared.
        let _ = faults.wait_for(free).await;
    }

    /// Calls of `endpoint` waiting at the gate now: a test knows its client is stuck there.
    pub fn held_calls(&self, endpoint: &str) -> usize {
        lock(&self.held).get(endpoint).copied().unwrap_or(0)
    }

    /// Takes one of the `fail_next` failures, if any are left.
    pub fn take_failure(&self) -> bool {
        self.take_one(|f| &mut f.fail_next)
    }

    /// Counts down the fault `counter` picks; true when one was left to take.
    fn take_one(&self, counter: impl Fn(&mut Faults) -> &mut u32) -> bool {
        let mut taken = false;
        self.faults.send_if_modified(|f| {
            let left = counter(f);
            taken = *left > 0;
            *left = left.saturating_sub(1);
            taken
        });
        taken
    }

    pub fn token_epoch(&self) -> u64 {
        self.token_epoch.load(Ordering::SeqCst)
    }

    /// Every token issued so far stops working.
    pub fn expire_tokens(&self) {
        self.token_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Moves a share of labs to another state (the background churn of demos).
    /// Moves about `share` of the labs to another state; with `description_chars`, gives each
    /// of them a new description that long too (large events). Returns how many changed.
    pub fn churn(&self, share: f64, description_chars: usize) -> usize {
        let ids = self.lab_ids();
        let mut changed = 0;
        for id in ids {
            let (hit, next, letter) = {
                let mut rng = lock(&self.rng);
                let letter = char::from(b'a' + (rng.below(26) as u8));
                (
                    rng.unit() < share,
                    rng.pick(&LabState::ALL).to_string(),
                    letter,
                )
            };
            let change = |l: &mut SimLab| {
                l.state = next.clone();
                if description_chars > 0 {
                    l.description = std::iter::repeat_n(letter, description_chars).collect();
                }
            };
            if hit && self.update_lab(&id, change) {
                changed += 1;
            }
        }
        changed
    }

    pub fn roll(&self) -> f64 {
        lock(&self.rng).unit()
    }

    pub fn pick_status(&self, statuses: &[u16]) -> u16 {
        let defaults = [500, 502, 503];
        let list = if statuses.is_empty() {
            &defaults[..]
        } else {
            statuses
        };
        *lock(&self.rng).pick(list)
    }

    pub fn count_call(&self, endpoint: &str) {
        *lock(&self.calls).entry(endpoint.to_owned()).or_default() += 1;
    }

    pub fn calls(&self) -> BTreeMap<String, u64> {
        lock(&self.calls).clone()
    }

    pub fn reset_calls(&self) {
        lock(&self.calls).clear();
    }
}

trait TruncateNanos {
    fn with_nanosecond0(self) -> Self;
}

impl TruncateNanos for DateTime<Utc> {
    /// CML reports times with seconds precision.
    fn with_nanosecond0(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_fleet() {
        let gen = |seed| {
            let mut rng = Rng::new(seed);
            let w = SimWorker::generate(0, 5, Personality::V2_9, &mut rng);
            (
                w.id.clone(),
                w.labs()
                    .into_iter()
                    .map(|l| (l.id, l.title, l.state))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(gen(7).0, gen(7).0);
        assert_eq!(gen(7).1, gen(7).1);
        assert_ne!(gen(7).0, gen(8).0);
    }

    #[test]
    fn the_tiles_body_follows_every_change_of_the_labs() {
        let mut rng = Rng::new(3);
        let w = SimWorker::generate(0, 3, Personality::V2_10, &mut rng);
        let tiles = |w: &SimWorker| -> Value {
            let v: Value = serde_json::from_slice(&w.tiles_body()).expect("json");
            v["lab_tiles"].clone()
        };
        let first = tiles(&w);
        assert_eq!(first.as_object().expect("map").len(), 3);
        assert_eq!(tiles(&w), first, "unchanged labs give the same body");
        let id = w.lab_ids()[0].clone();
        assert!(w.update_lab(&id, |l| l.state = "QUEUED".into()));
        assert_eq!(tiles(&w)[&id]["state"], "QUEUED");
        let added = w.create_lab(None);
        assert!(tiles(&w).get(&added).is_some());
        assert!(w.delete_lab(&id));
        assert!(tiles(&w).get(&id).is_none());
        let before = tiles(&w);
        assert!(w.churn(1.0, 0) > 0);
        assert_ne!(tiles(&w), before);
        let before = tiles(&w);
        assert!(w.churn(1.0, 100) > 0);
        assert!(w.labs().iter().all(|l| l.description.len() == 100));
        assert_ne!(tiles(&w), before);
        let fresh: serde_json::Map<String, Value> = w
            .labs()
            .iter()
            .map(|l| (l.id.clone(), l.to_tile(w.personality)))
            .collect();
        assert_eq!(
            tiles(&w),
            Value::Object(fresh),
            "the cache is what a fresh build gives"
        );
    }

    #[test]
    fn each_team_member_sees_the_share_of_the_labs_given_to_their_team() {
        for p in Personality::ALL {
            let w = SimWorker::generate(0, 100, p, &mut Rng::new(9));
            let before = tiles_of(&w);
            w.add_teams(25);
            let users = w.directory(|d| d.users.len());
            assert_eq!(users, SEEDED.len() + 25);
            let id_of = |name: &str| w.directory(|d| d.by_name(name).map(|u| u.id.clone()));
            let sees = |name: &str| {
                let id = id_of(name).expect("user");
                w.labs_visible_to(&id)
                    .into_iter()
                    .map(|l| l.id)
                    .collect::<BTreeSet<_>>()
            };
            // Three teams (10, 10, 5 users), each given every third lab; the users own none.
            let first = sees("user-000");
            assert_eq!(first.len(), 34, "{p:?}");
            assert_eq!(sees("user-009"), first, "teammates see the same labs");
            let second = sees("user-010");
            assert_eq!(second.len(), 33);
            assert!(first.is_disjoint(&second));
            assert_eq!(sees("user-024").len(), 33);
            assert!(id_of("user-025").is_none());
            // The tiles show the new groups; nothing else of the labs changed.
            let after = tiles_of(&w);
            for (id, tile) in before.as_object().expect("tiles") {
                let mut was = tile.clone();
                let mut now = after[id].clone();
                was.as_object_mut().expect("tile").remove("groups");
                now.as_object_mut().expect("tile").remove("groups");
                assert_eq!(was, now);
            }
        }
    }

    fn tiles_of(w: &SimWorker) -> Value {
        let v: Value = serde_json::from_slice(&w.tiles_body()).expect("json");
        v["lab_tiles"].clone()
    }

    #[test]
    fn groups_list_their_labs_as_the_release_does() {
        let mut rng = Rng::new(5);
        for p in Personality::ALL {
            let w = SimWorker::generate(0, 4, p, &mut rng);
            let lab = w.lab_ids()[0].clone();
            let netops = w.group_named("netops");
            assert_eq!(w.group_named("netops"), netops, "one group per name");
            let fresh = w.group_named("brand-new");
            assert!(w.set_lab_groups(
                &lab,
                vec![
                    SimGroup {
                        id: netops.clone(),
                        name: "netops".into(),
                        permissions: vec!["lab_view".into()],
                    },
                    SimGroup {
                        id: fresh.clone(),
                        name: "brand-new".into(),
                        permissions: vec!["lab_admin".into()],
                    },
                ],
            ));
            let groups = w.groups_json(None);
            let groups = groups.as_array().expect("list");
            assert_eq!(groups.len(), 5, "the four generated groups and the new one");
            let key = if p == Personality::V2_4 {
                "labs"
            } else {
                "associations"
            };
            let of = |id: &str| -> Vec<Value> {
                groups
                    .iter()
                    .find(|g| g["id"] == id)
                    .and_then(|g| g[key].as_array().cloned())
                    .expect("group with its labs")
            };
            assert!(of(&fresh).iter().any(|a| a["id"] == lab.as_str()));
            assert!(of(&netops).iter().any(|a| a["id"] == lab.as_str()));
            let mine = of(&fresh);
            let a = mine.iter().find(|a| a["id"] == lab.as_str()).expect("lab");
            if p == Personality::V2_4 {
                assert_eq!(a["permission"], "read_write");
            } else {
                assert_eq!(a["permissions"], json!(["lab_admin"]));
            }
            // Every generated association is listed under its group.
            for l in w.labs() {
                for g in &l.groups {
                    assert!(of(&g.id).iter().any(|a| a["id"] == l.id.as_str()));
                }
            }
        }
    }

    #[test]
    fn payloads_follow_the_personality() {
        let mut rng = Rng::new(1);
        let w = SimWorker::generate(0, 1, Personality::V2_4, &mut rng);
        let mut lab = w.labs().remove(0);
        lab.groups = vec![SimGroup {
            id: "g1".into(),
            name: "netops".into(),
            permissions: vec!["lab_view".into(), "lab_edit".into()],
        }];
        let v24 = lab.to_json(Personality::V2_4);
        assert!(v24.get("owner_fullname").is_none());
        assert_eq!(v24["groups"][0]["name"], "netops");
        assert_eq!(v24["groups"][0]["permission"], "read_write");
        assert!(v24["created"].as_str().expect("time").ends_with("+00:00"));
        let v29 = lab.to_json(Personality::V2_9);
        assert_eq!(v29["groups"], json!([]));
        let v210 = lab.to_json(Personality::V2_10);
        assert!(v210.get("groups").is_none());
        assert!(v210["created"].as_str().expect("time").ends_with('Z'));
        assert!(v210.get("autostart").is_some());
        let tile = lab.to_tile(Personality::V2_10);
        assert_eq!(
            tile["topology"]["nodes"].as_array().map(Vec::len),
            Some(lab.node_count as usize)
        );
    }
}
